"""Fused backward pass: the optimizer steps each tensor inside backward, as soon as its gradient is complete.

A normal step keeps every gradient alive until ``optimizer.step()``; for a full fine-tune that is one more
fp32 copy of the model. Here each trained tensor gets a ``register_post_accumulate_grad_hook`` that steps a
one-tensor optimizer and frees the gradient at once, so at most a few gradients exist at any moment
(PyTorch's "optimizer step in backward" recipe).

Consequences the caller must respect (``tuner validate`` refuses the combinations):

- no gradient accumulation: the step happens during every backward;
- no clipping by the global gradient norm: that norm is known only after the last tensor was stepped
  (the norm of the gradients is still computed, for logging and for the NaN guard);
- no fp16 gradient scaler: it would need every gradient unscaled before any step.

:class:`FusedBackward` is a ``torch.optim.Optimizer`` over the same parameter groups as the unfused
optimizer, so LR schedulers drive it, and ``state_dict()`` has the same layout as the unfused optimizer's
(a checkpoint resumes with or without fusing). Its ``step()`` does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


class FusedBackward(torch.optim.Optimizer):
    """Per-tensor optimizers stepped from gradient hooks.

    ``make(groups)`` builds the real optimizer for a list of parameter groups (e.g. a ``partial`` of
    :func:`tuner.optim.optimizers.build_optimizer`); it is called once per trained tensor with one group of
    one tensor. All the one-tensor optimizers share this object's ``state``.

    NaN guard: a tensor whose gradient is NaN/inf is not stepped (its gradient is dropped) and
    :attr:`grad_norm` becomes NaN for that backward; tensors stepped before it in the same backward keep
    their update (their gradients were finite). A non-finite *loss* should not be backpropagated at all.
    """

    fused = True

    def __init__(self, param_groups: Sequence[dict[str, Any]], make: Callable[[list[dict[str, Any]]], Any]):
        super().__init__([dict(g) for g in param_groups], {})
        self._inner: dict[torch.Tensor, Any] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._handles = []
        self._sq = 0.0
        self._finite = True
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                single = {k: v for k, v in group.items() if k != "params"}
                inner = make([{**single, "params": [p]}])
                inner.state = self.state  # one state table: state_dict() sees every tensor's state
                # the outer group carries the real optimizer's hyperparameters (betas, eps...), so that a
                # state_dict loads into the unfused optimizer and back
                for key, value in inner.param_groups[0].items():
                    group.setdefault(key, value)
                self._inner[p] = inner
                self._group_index[p] = gi
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_tensor))

    def _step_tensor(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        sq = float(grad.detach().float().pow(2).sum())  # one sync per tensor: the price of the NaN guard
        if not math.isfinite(sq):
            self._finite = False
        else:
            self._sq += sq
            inner = self._inner[p]
            # the LR schedule (and load_state_dict) change the outer group: the inner one follows
            outer = self.param_groups[self._group_index[p]]
            inner.param_groups[0].update((k, v) for k, v in outer.items() if k != "params")
            inner.step()
        p.grad = None

    @property
    def grad_norm(self) -> float:
        """Norm of the gradients seen since the last :meth:`zero_grad` (NaN if one was non-finite)."""
        return math.sqrt(self._sq) if self._finite else float("nan")

    def step(self, closure=None):  # noqa: D102 - the work happened in backward
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._sq, self._finite = 0.0, True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for inner in self._inner.values():
            inner.state = self.state  # load_state_dict replaced the table

    def remove_hooks(self) -> None:
        """Detach from the parameters (they then need an ordinary optimizer to train)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
