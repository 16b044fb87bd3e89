"""Exponential moving average of the trained parameters (``train.ema_decay``).

The average is what previews and the exported files use when it is on: it smooths the last steps' noise,
which matters most for full fine-tunes and short, high-learning-rate adapter runs. It can live on the CPU
(``train.ema_on_cpu``) so it costs no accelerator memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class Ema:
    """Shadow copies of named parameters, updated with ``decay`` after every optimizer step.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early steps do
    not drag the average towards the initial weights for thousands of steps.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float, *, device: torch.device | str | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.params = dict(params)
        self.shadow = {
            name: p.detach().to(device or p.device, dtype=torch.float32, copy=True) for name, p in self.params.items()
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for name, p in self.params.items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - d)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averaged values; the trained ones come back after."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.device, p.dtype))
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(saved[name])

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint (``ema.<name>``) plus the update count as a 0-dim tensor."""
        out = {f"ema.{name}": t.cpu() for name, t in self.shadow.items()}
        out["ema.__updates__"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = [name for name in self.shadow if f"ema.{name}" not in tensors]
        if missing or "ema.__updates__" not in tensors:
            raise KeyError(f"checkpoint lacks EMA tensors, e.g. {missing[:3]}")
        for name, s in self.shadow.items():
            s.copy_(tensors[f"ema.{name}"].to(s.device, s.dtype))
        self.updates = int(tensors["ema.__updates__"])
