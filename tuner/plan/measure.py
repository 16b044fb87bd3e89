"""Peak tensor memory of real code on any device, by category: what ``torch.cuda.max_memory_allocated``
reports on a GPU, measured on the CPU too (where PyTorch keeps no allocator statistics), so ``tuner plan``'s
prediction can be checked against a training step without an accelerator.

A :class:`TensorMemory` context counts every tensor storage alive inside it: those that exist when it opens
(found with the garbage collector: weights, optimizer states, caches) and every storage an operator creates
while it is open (a ``TorchDispatchMode`` sees each op, forward and backward, including recomputation under
gradient checkpointing). A storage stops counting when it is freed (a weak reference on it). Views share
their storage and count once.

What it does not see, like ``max_memory_allocated``: the allocator's slack (freed blocks a caching allocator
keeps), the CUDA context, and the process's own memory (Python, the libraries' code). Those are why the
process's resident set on the CPU is larger than the tensors (``bench/plan_accuracy.py`` reports both).
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = (
    "frozen weights",
    "trainable weights",
    "gradients",
    "optimizer states",
    "activations",
    "optimizer step",
    "other",
)


@dataclass
class MemorySnapshot:
    """Bytes by category at one moment. ``activations``: storages created by the forward and backward
    passes that are not gradients (saved tensors, their temporaries, recomputed blocks); ``optimizer step``:
    created inside ``optimizer.step()`` (its temporaries; the states themselves exist before, once the
    first step is done); ``other``: everything else alive when the context opened (caches, buffers)."""

    total: int = 0
    by_category: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> int:
        return self.by_category.get(name, 0)


def _storage(t: torch.Tensor) -> Any | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta-less wrappers
        return None


class TensorMemory(TorchDispatchMode):
    """Counts live tensor bytes on ``device`` (``cpu``, ``cuda``...); ``peak`` is the largest total seen
    and ``at_peak`` its breakdown. ``exclude``: modules whose weights do not count (components moved off
    the training device: on the CPU they stay in the same memory). ``trainable``/``optimizer`` label the
    weights, gradients and states."""

    def __init__(
        self,
        device: str | torch.device,
        *,
        trainable: Iterable[torch.Tensor] = (),
        optimizer: torch.optim.Optimizer | None = None,
        exclude: Iterable[torch.nn.Module] = (),
    ):
        super().__init__()
        self.device = torch.device(device).type
        self._trainable = list(trainable)
        self._optimizer = getattr(
            optimizer, "optimizer", optimizer
        )  # accelerate's wrapper holds the real one
        self._exclude = list(exclude)
        self._live: dict[int, tuple[int, str, Any]] = {}  # data_ptr -> (bytes, category, weakref)
        self._grads: set[int] = set()
        self._labels: dict[int, str] = {}
        self._total = 0
        self.peak = 0
        self.at_peak = MemorySnapshot()
        self._hooks: list[Any] = []
        self._in_step = False

    # --- bookkeeping -------------------------------------------------------------------------------------

    def _add(self, t: torch.Tensor, category: str) -> None:
        if t.device.type != self.device:
            return
        st = _storage(t)
        if st is None or st.nbytes() == 0:
            return
        key = st.data_ptr()
        if key in self._live:
            return
        ref = weakref.ref(st, lambda _r, key=key: self._drop(key))
        self._live[key] = (st.nbytes(), category, ref)
        self._total += st.nbytes()
        if self._total > self.peak:
            self.peak = self._total
            self.at_peak = self._snapshot()

    def _drop(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._total -= entry[0]
        self._grads.discard(key)

    def _snapshot(self) -> MemorySnapshot:
        counts: Counter[str] = Counter()
        for key, (nbytes, category, _ref) in self._live.items():
            counts["gradients" if key in self._grads else category] += nbytes
        return MemorySnapshot(total=self._total, by_category=dict(counts))

    def _label_existing(self) -> None:
        excluded = {p.untyped_storage().data_ptr() for m in self._exclude for p in m.parameters()}
        trainable = {p.untyped_storage().data_ptr() for p in self._trainable}
        states = set()
        if self._optimizer is not None:
            for state in self._optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        states.add(value.untyped_storage().data_ptr())
        params = set()
        for obj in gc.get_objects():
            if isinstance(obj, torch.nn.Module):
                params.update(p.untyped_storage().data_ptr() for p in obj.parameters(recurse=False))
        for obj in gc.get_objects():
            if not torch.is_tensor(obj) or obj.device.type != self.device or obj.is_meta:
                continue
            key = _storage(obj).data_ptr() if _storage(obj) is not None else None
            if key is None or key in excluded:
                continue
            category = (
                "trainable weights"
                if key in trainable
                else "optimizer states"
                if key in states
                else "frozen weights"
                if key in params
                else "other"
            )
            self._add(obj, category)

    # --- the mode ----------------------------------------------------------------------------------------

    def __enter__(self) -> TensorMemory:
        self._label_existing()
        for p in self._trainable:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self._optimizer is not None:
            self._hooks.append(
                self._optimizer.register_step_pre_hook(lambda *_: setattr(self, "_in_step", True))
            )
            self._hooks.append(
                self._optimizer.register_step_post_hook(lambda *_: setattr(self, "_in_step", False))
            )
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None and p.grad.device.type == self.device:
            key = p.grad.untyped_storage().data_ptr()
            if key in self._live:
                nbytes, _cat, ref = self._live[key]
                self._live[key] = (nbytes, "gradients", ref)
            else:
                self._add(p.grad, "gradients")
            self._grads.add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = "optimizer step" if self._in_step else "activations"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, category)
        return out

    @property
    def current(self) -> int:
        return self._total
