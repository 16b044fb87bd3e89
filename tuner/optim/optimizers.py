"""Optimizers and learning-rate schedules, built from plain arguments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tuner.errors import TunerError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
SCHEDULES = ("constant", "cosine")


def build_optimizer(
    name: str,
    param_groups: Sequence[dict[str, Any]],
    *,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    sharded: bool = False,
) -> torch.optim.Optimizer:
    """``adamw`` (torch), ``adamw8bit`` (bitsandbytes: 8-bit optimizer states, ~1/4 of AdamW's memory) or
    ``adafactor`` (transformers: a factored second moment only, a row and a column per matrix).

    Each group carries its own ``lr`` (UNet and text encoder can differ). Adafactor runs with
    ``relative_step=False`` and ``scale_parameter=False``, so each group's ``lr`` (and the LR schedule) is
    the step size, as with AdamW; ``betas`` and ``eps`` do not apply to it (no first moment, its own eps).

    ``sharded``: inside an initialised process group, torch's ``ZeroRedundancyOptimizer`` around that optimizer
    (ZeRO stage 1: each process holds and steps the states of its share of the tensors, then broadcasts them).
    Its ``state_dict()`` needs ``consolidate_state_dict()`` on every process first
    (:func:`tuner.train.distributed.gather_optimizer_state`).
    """
    cls, kwargs = _optimizer_class(name, param_groups, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(list(param_groups), optimizer_class=cls, **kwargs)
    return cls(param_groups, **kwargs)


def _optimizer_class(name: str, param_groups: Sequence[dict[str, Any]], **kwargs: Any) -> tuple[type, dict[str, Any]]:
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {"lr": param_groups[0]["lr"] if param_groups else 1e-4, "relative_step": False,
                           "scale_parameter": False, "warmup_init": False, "weight_decay": kwargs["weight_decay"]}
    if name == "adamw":
        return torch.optim.AdamW, kwargs
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TunerError(
                "optimizer 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes` "
                "(or `pip install 'tuner-diffusion[bnb]'`), or set optim.optimizer = \"adamw\""
            ) from exc
        return bnb.optim.AdamW8bit, kwargs
    raise TunerError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def build_schedule(
    optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup_steps``, then constant or cosine decay to 0 at ``total_steps``."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULES:
        raise TunerError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    diffusers_name = "constant_with_warmup" if name == "constant" else "cosine"
    return get_scheduler(
        diffusers_name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )
