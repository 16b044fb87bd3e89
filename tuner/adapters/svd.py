"""Low-rank approximation of weight deltas by SVD, shared by ``tuner extract`` and ``tuner resize``.

Tensor conventions (FORMATS.md §1.1, §7): a Linear delta is ``[out, in]``; a Conv2d delta is
``[out, in, kh, kw]`` and is factored as the matrix ``[out, in*kh*kw]``. Factors come back in LoRA layout,
``up @ down`` (flattened) approximating the delta at scale 1 (``alpha = rank``):

* Linear: ``down [r, in]``, ``up [out, r]``;
* Conv2d (1x1 or kxk): ``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``.

All arithmetic is fp32 on the delta's device, whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DYNAMIC_RANK_MODES = ("sv_ratio", "sv_fro", "sv_cumulative")
DEFAULT_CLAMP_QUANTILE = 0.99  # kohya's extract_lora_from_models.py default


class LowRank(NamedTuple):
    """``up``/``down`` factors in LoRA layout and the fraction of the delta's energy they keep."""

    up: torch.Tensor
    down: torch.Tensor
    retained: float


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """A Linear or Conv2d delta as an fp32 ``[out, in*kh*kw]`` matrix (a 1x1 conv becomes ``[out, in]``).

    ``ValueError`` for other ranks of tensor or non-finite values.
    """
    if delta.ndim not in (2, 4):
        raise ValueError(
            "expected a Linear delta [out, in] or a Conv2d delta [out, in, kh, kw], "
            f"got shape {tuple(delta.shape)}"
        )
    matrix = delta.detach().float().reshape(delta.shape[0], -1)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"the delta (shape {tuple(delta.shape)}) holds NaN or inf values")
    return matrix


def low_rank(
    delta: torch.Tensor, rank: int, *, clamp_quantile: float | None = DEFAULT_CLAMP_QUANTILE
) -> LowRank:
    """Best rank-``rank`` factors of ``delta`` (truncated SVD): ``up = U[:, :r] * S[:r]``, ``down = Vh[:r]``.

    * ``r = min(rank, out, in*kh*kw)``: a rank above the matrix's size is clamped, never padded.
    * ``retained = sum(S[:r]^2) / sum(S^2)``, the fraction of the squared Frobenius norm the truncation
      keeps (1.0 for a zero delta). It describes the SVD, before any clamping.
    * ``clamp_quantile`` (kohya's default 0.99): both factors are clamped to ``±q``, where ``q`` is that
      quantile of ``|cat(up, down)|``; this trims outliers that would overflow fp16, at a small cost in
      accuracy. ``None`` keeps the exact truncated SVD.

    Returns factors in LoRA layout (module docstring), fp32, contiguous. ``ValueError`` for ``rank < 1``, a
    quantile outside ``(0, 1]``, or a delta that is not a finite 2-D/4-D tensor.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise ValueError(f"clamp_quantile must be in (0, 1] or None, got {clamp_quantile}")
    matrix = as_matrix(delta)
    r = min(rank, matrix.shape[0], matrix.shape[1])
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.double().square()
    total = float(energy.sum())
    retained = 1.0 if total == 0.0 else float(energy[:r].sum()) / total
    up = u[:, :r] * s[:r]
    down = vh[:r]
    if clamp_quantile is not None:
        bound = quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up = up.clamp(-bound, bound)
        down = down.clamp(-bound, bound)
    if delta.ndim == 4:
        down = down.reshape(r, *delta.shape[1:])
        up = up.reshape(delta.shape[0], r, 1, 1)
    return LowRank(up.contiguous(), down.contiguous(), min(retained, 1.0))


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of ``values`` with linear interpolation, as ``torch.quantile`` computes it, but
    without its limit of 2**24 elements (large factor pairs exceed it)."""
    flat = values.detach().flatten().float()
    if flat.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    position = q * (flat.numel() - 1)
    lower = math.floor(position)
    upper = min(lower + 1, flat.numel() - 1)
    a = float(flat.kthvalue(lower + 1).values)
    b = float(flat.kthvalue(upper + 1).values)
    return a + (b - a) * (position - lower)


def choose_rank(s: torch.Tensor, mode: str, param: float, *, max_rank: int | None = None) -> int:
    """A rank chosen from singular values ``s`` (descending), as kohya's ``resize_lora.py`` dynamic modes.

    * ``sv_ratio``: keep the values larger than ``S[0] / param`` (``param >= 1``);
    * ``sv_cumulative``: the smallest ``k`` with ``sum(S[:k]) / sum(S) >= param`` (``0 < param <= 1``);
    * ``sv_fro``: the smallest ``k`` with ``sum(S[:k]^2) / sum(S^2) >= param^2``, i.e. the kept
      Frobenius norm reaches the fraction ``param`` (``0 < param <= 1``).

    The result is clamped to ``[1, len(S)]`` and to ``max_rank`` when given (resize passes the old rank);
    an all-zero spectrum gives 1 (FORMATS.md §7). ``ValueError`` for an unknown mode, a parameter out of
    range or an empty/non-1-D ``s``.
    """
    if mode not in DYNAMIC_RANK_MODES:
        raise ValueError(f"unknown dynamic rank mode {mode!r}; choose from {', '.join(DYNAMIC_RANK_MODES)}")
    if mode == "sv_ratio" and not param >= 1.0:
        raise ValueError(f"sv_ratio takes a ratio S[0]/S[k] of at least 1 (e.g. 10), got {param}")
    if mode != "sv_ratio" and not 0.0 < param <= 1.0:
        raise ValueError(f"{mode} takes a fraction in (0, 1] (e.g. 0.9), got {param}")
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of singular values, got shape {tuple(s.shape)}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    values = s.detach().double().cpu()
    limit = min(values.numel(), max_rank or values.numel())
    if float(values[0]) <= 0.0:
        return 1
    if mode == "sv_ratio":
        k = int((values > values[0] / param).sum())
    else:
        weights = values if mode == "sv_cumulative" else values.square()
        target = param if mode == "sv_cumulative" else param * param
        cumulative = torch.cumsum(weights, 0) / weights.sum()
        k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64))) + 1
    return max(1, min(k, limit))
