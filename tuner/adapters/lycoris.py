"""LyCORIS adapter modules (LoHa, LoKr) and DoRA, as weight deltas (read-only: tuner merges them).

The layouts are LyCORIS's, as published in its kohya-style files and read by ComfyUI and A1111. Every
factor is used in fp32; ``scale = alpha / dim`` where ``dim`` is the module's rank (1 when there is no
alpha or, for LoKr, no low-rank factor at all). Tensor conventions, for a base weight ``W [out, in]`` or
``[out, in, kh, kw]``:

* **LoHa** (Hadamard product of two low-rank matrices): ``dW = scale * (w1a @ w1b) * (w2a @ w2b)``,
  reshaped to ``W``'s shape; ``w1a [out, r]``, ``w1b [r, in*kh*kw]``. With Tucker factors
  (``hada_t1``/``hada_t2 [r, r, kh, kw]``, then ``w1a [r, out]``, ``w1b [r, in]``) each matrix is
  ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``. ``r = w1b.shape[0]``.
* **LoKr** (Kronecker product): ``dW = scale * kron(w1, w2)``, where ``w1 [a, b]`` is ``lokr_w1`` or
  ``lokr_w1_a @ lokr_w1_b`` and ``w2 [c, d]`` (or ``[c, d, kh, kw]``) is ``lokr_w2``, ``lokr_w2_a @
  lokr_w2_b`` or the Tucker form with ``lokr_t2``; ``a*c = out``, ``b*d = in``. ``dim`` is the rank of the
  low-rank factor (``w2``'s if both are low rank, as ComfyUI reads it); with two full matrices the scale
  is 1 whatever alpha says.
* **DoRA** (weight-decomposed): a magnitude ``m`` (``dora_scale``) next to any of the above (or a plain
  LoRA). The merged weight is ``W' = m * (W + dW) / ||W + dW||``, the norm taken per output row when ``m``
  is ``[out, 1, ...]`` (PEFT, LyCORIS ``wd_on_out``) and per input column when it is ``[1, in, ...]``
  (older LyCORIS). A multiplier ``s`` blends the result: ``W + s * (W' - W)`` (as ComfyUI applies a
  strength), so ``s = 1`` is the exact DoRA weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tuner.adapters.types import LoraModule

_EPS = 1e-12  # keeps an all-zero column from dividing by zero (LyCORIS/ComfyUI add a dtype epsilon too)


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild: ``[out, in, kh, kw]`` from ``t [r, r, kh, kw]``, ``w_a [r, out]``,
    ``w_b [r, in]``."""
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), w_b.float(), w_a.float())


def _scale(alpha: float | None, dim: int | None) -> float:
    return 1.0 if alpha is None or dim is None else alpha / dim


@dataclass
class LohaModule:
    """LoHa factors of one layer (module docstring); ``alpha`` None means scale 1."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t1 is not None and self.t2 is not None:
            return _tucker(self.t1, self.w1a, self.w1b), _tucker(self.t2, self.w2a, self.w2b)
        return self.w1a.float() @ self.w1b.float(), self.w2a.float() @ self.w2b.float()

    def out_in(self) -> tuple[int, int]:
        """``(out, in * kh * kw)`` of the weight this module fits (``in`` alone for Tucker factors)."""
        if self.t1 is not None:
            return int(self.w1a.shape[1]), int(self.w1b.shape[1])
        return int(self.w1a.shape[0]), int(self.w1b.shape[1])

    def delta(self, weight_shape: torch.Size | tuple[int, ...], multiplier: float = 1.0) -> torch.Tensor:
        m1, m2 = self._matrices()
        return (multiplier * self.scale) * (m1 * m2).reshape(weight_shape)


@dataclass
class LokrModule:
    """LoKr factors of one layer: each side is a full matrix (``w1``/``w2``) or low-rank factors (``w1a``,
    ``w1b`` / ``w2a``, ``w2b``, optionally ``t2``). ``alpha`` None means scale 1."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    kind = "lokr"

    @property
    def rank(self) -> int | None:
        """The rank of the low-rank side (``w2``'s when both are), None when both are full matrices."""
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return None

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` rebuilt in fp32."""
        if self.w1 is not None:
            w1 = self.w1.float()
        else:
            w1 = self.w1a.float() @ self.w1b.float()  # type: ignore[union-attr]
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2a, self.w2b)  # type: ignore[arg-type]
        else:
            w2 = self.w2a.float() @ self.w2b.float()  # type: ignore[union-attr]
        return w1, w2

    def out_in(self) -> tuple[int, int]:
        w1_shape = self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])  # type: ignore[union-attr]
        if self.w2 is not None:
            w2_shape = tuple(self.w2.shape)
        elif self.t2 is not None:
            w2_shape = (self.w2a.shape[1], self.w2b.shape[1])  # type: ignore[union-attr]
        else:
            w2_shape = (self.w2a.shape[0], self.w2b.shape[1])  # type: ignore[union-attr]
        return int(w1_shape[0] * w2_shape[0]), int(w1_shape[1] * w2_shape[1])

    def delta(self, weight_shape: torch.Size | tuple[int, ...], multiplier: float = 1.0) -> torch.Tensor:
        w1, w2 = self.factors()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return (multiplier * self.scale) * torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight_shape)


@dataclass
class DoraModule:
    """A DoRA magnitude ``magnitude`` (``dora_scale``) over an inner LoRA/LoHa/LoKr module."""

    inner: LoraModule | LohaModule | LokrModule
    magnitude: torch.Tensor

    kind = "dora"

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    def out_in(self) -> tuple[int, int]:
        return out_in(self.inner)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``m * (W + dW) / ||W + dW||`` in fp32 (module docstring)."""
        w = weight.detach().float()
        combined = w + self.inner.delta(w.shape)
        m = self.magnitude.float().to(w.device)
        if m.shape[0] == w.shape[0] and m.numel() == w.shape[0]:  # per output row
            norm = combined.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1))
            m = m.reshape(norm.shape)
        elif m.numel() == w.shape[1]:  # per input column
            norm = combined.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, w.shape[1], *[1] * (w.ndim - 2))
            m = m.reshape(norm.shape)
        else:
            raise ValueError(
                f"dora_scale of shape {tuple(self.magnitude.shape)} fits neither the rows nor the columns of a "
                f"weight of shape {tuple(w.shape)}"
            )
        return combined * (m / (norm + _EPS))


AdapterModule = LoraModule | LohaModule | LokrModule | DoraModule
"""Anything :attr:`tuner.adapters.types.LoraWeights.modules` may hold once a file is read."""


def kind_of(module: object) -> str:
    """``lora``, ``loha``, ``lokr`` or ``dora+<inner kind>``."""
    if isinstance(module, DoraModule):
        return "dora+" + kind_of(module.inner)
    return str(getattr(module, "kind", "lora"))


def out_in(module: object) -> tuple[int, int]:
    """``(out features, in features)`` the module expects of its base weight; for non-Tucker LoHa the
    second number is ``in * kh * kw``."""
    if isinstance(module, LoraModule):
        return int(module.up.shape[0]), int(module.down.shape[1])
    return module.out_in()  # type: ignore[attr-defined]


def fit_problem(module: object, weight_shape: torch.Size | tuple[int, ...]) -> str | None:
    """Why ``module`` cannot apply to a weight of ``weight_shape``, or None if it fits."""
    out_f, in_f = out_in(module)
    shape = tuple(int(d) for d in weight_shape)
    numel = math.prod(shape)
    fits = out_f == shape[0] and (in_f == shape[1] or out_f * in_f == numel)
    if isinstance(module, LoraModule):
        fits = (out_f, in_f) == shape[:2]
    if not fits:
        return f"adapter [{out_f}, {in_f}] vs base {list(shape[:2])}"
    return None


def weight_delta(module: object, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """What merging ``module`` at ``multiplier`` adds to ``weight``, in fp32 (DoRA needs the weight)."""
    if isinstance(module, DoraModule):
        return multiplier * (module.merged_weight(weight) - weight.detach().float())
    return module.delta(weight.shape, multiplier)  # type: ignore[attr-defined]
