"""``tuner resize``: lower the rank of a kohya LoRA/LoCon file by SVD, keeping its effective scale.

Per module (FORMATS.md §7): the unscaled product ``M = up @ down`` is factored, the new rank ``k`` is fixed
or chosen from the singular values (``tuner.adapters.svd.choose_rank``), the new factors are
``up' = U[:, :k] diag(S[:k])`` and ``down' = Vh[:k]``, and **alpha' = (alpha / r) * k**, so
``alpha' / k * up' @ down'`` is the best rank-k approximation of the module's delta. Works on the file's
own key names, so it needs no model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from tuner.adapters.svd import choose_rank
from tuner.errors import TunerError
from tuner.formats.detect import KOHYA_FORMATS, detect_format
from tuner.formats.io import read_safetensors, save_safetensors
from tuner.formats.metadata import TUNER_KEY, finalize_lora_file, read_tuner_block

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass(frozen=True)
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    retained: float
    """Fraction of the delta's squared Frobenius norm the new rank keeps."""

    @property
    def rel_error(self) -> float:
        """``||delta - approx||_F / ||delta||_F``."""
        return max(0.0, 1.0 - self.retained) ** 0.5


@dataclass
class ResizeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[ModuleResize] = field(default_factory=list)

    def worst(self, n: int) -> list[ModuleResize]:
        return sorted(self.modules, key=lambda m: m.retained)[:n]


def _svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``up @ down`` ([out, r] @ [r, in]) through two thin QRs and an r x r SVD: exact, and cheap
    even for 1280-wide layers."""
    qa, ra = torch.linalg.qr(up)
    qb, rb = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, vh @ qb.T


def resize_tensors(
    tensors: dict[str, torch.Tensor],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
) -> tuple[dict[str, torch.Tensor], list[ModuleResize]]:
    """New kohya tensors (fp32) and a report per module. Exactly one of ``rank`` and ``dynamic``;
    ``conv_rank`` applies to 3x3 convs (default: ``rank``). Ranks never grow: a module already at or below
    the target keeps its rank (and its factors are re-derived, which is lossless)."""
    if (rank is None) == (dynamic is None):
        raise TunerError("resize: give either a fixed --rank or --dynamic MODE with --param")
    if rank is not None and rank < 1 or conv_rank is not None and conv_rank < 1:
        raise TunerError(f"resize: ranks must be at least 1 (got rank {rank}, conv rank {conv_rank})")
    if dynamic is not None and param is None:
        raise TunerError(f"resize: --dynamic {dynamic} needs --param (e.g. 0.9 for sv_fro)")
    out: dict[str, torch.Tensor] = {}
    reports: list[ModuleResize] = []
    names = sorted(k[: -len(DOWN)] for k in tensors if k.endswith(DOWN))
    for name in names:
        down, up = tensors[name + DOWN].float(), tensors.get(name + UP)
        if up is None:
            raise TunerError(f"resize: module '{name}' has {DOWN} but no {UP}")
        up = up.float()
        r = int(down.shape[0])
        alpha = float(tensors[name + ALPHA]) if name + ALPHA in tensors else float(r)
        u, s, vh = _svd_of_product(up.flatten(1), down.flatten(1))
        is_conv3 = down.ndim == 4 and down.shape[2:] != (1, 1)
        if dynamic is not None:
            try:
                k = choose_rank(s, dynamic, float(param), max_rank=r)  # type: ignore[arg-type]
            except ValueError as exc:
                raise TunerError(f"resize: {exc}") from None
        else:
            k = min(r, (conv_rank or rank) if is_conv3 else rank)  # type: ignore[type-var]
        k = min(k, int(s.numel()))  # a rank above min(out, in) has nothing more to keep
        energy = s.double().square()
        total = float(energy.sum())
        retained = 1.0 if total == 0.0 else min(1.0, float(energy[:k].sum()) / total)
        new_up = u[:, :k] * s[:k]
        new_down = vh[:k]
        if down.ndim == 4:
            new_down = new_down.reshape(k, *down.shape[1:])
            new_up = new_up.reshape(up.shape[0], k, 1, 1)
        out[name + DOWN] = new_down.contiguous()
        out[name + UP] = new_up.contiguous()
        out[name + ALPHA] = torch.tensor(alpha / r * k, dtype=torch.float32)
        reports.append(ModuleResize(name, r, k, retained))
    factors = {name + suffix for name in names for suffix in (DOWN, UP, ALPHA)}
    for key, value in tensors.items():  # anything that is not a factor (e.g. bundle_emb.*) is kept as is
        if key not in factors:
            out[key] = value
    return out, reports


def resize_file(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    dtype: torch.dtype | None = None,
) -> ResizeResult:
    """Resize the kohya file ``path`` into ``out`` (atomic); metadata updated and hashes recomputed.
    ``dtype`` None keeps the file's factor dtype."""
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, {k: tuple(v.shape) for k, v in tensors.items()})
    if fmt not in (*KOHYA_FORMATS, "kohya-bundle"):  # a bundle's embeddings are carried over unchanged
        raise TunerError(f"resize: '{path}' is a {fmt} file; resize reads kohya LoRA/LoCon files "
                         "(lora_down/lora_up/alpha keys)")
    first = next(k for k in tensors if k.endswith(DOWN))
    dtype = dtype or tensors[first].dtype
    new, reports = resize_tensors(tensors, rank=rank, conv_rank=conv_rank, dynamic=dynamic, param=param)
    new = {k: (v.to(dtype) if k.endswith((DOWN, UP)) else v) for k, v in new.items()}
    meta = dict(metadata)
    how = f"dynamic {dynamic}={param}" if dynamic else f"rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "")
    ranks = {m.new_rank for m in reports}
    alphas = {float(new[m.name + ALPHA]) for m in reports}
    meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    comment = f"resized by tuner to {how}"
    meta["ss_training_comment"] = comment + (f"; {metadata['ss_training_comment']}" if metadata.get("ss_training_comment") else "")
    block = read_tuner_block(meta) or {}
    block["resized"] = {"how": how, "mean_retained": round(sum(m.retained for m in reports) / max(1, len(reports)), 6)}
    meta[TUNER_KEY] = json.dumps(block, sort_keys=True)
    final = finalize_lora_file(new, meta)
    save_safetensors(out, new, final)
    return ResizeResult(new, final, reports)


def format_resize_report(result: ResizeResult, rows: int = 10) -> str:
    lines = []
    width = max((len(m.name) for m in result.modules), default=6)
    lines.append(f"{'module':<{width}}  rank  retained  rel. error")
    for m in result.worst(rows):
        lines.append(f"{m.name:<{width}}  {m.old_rank:>2}->{m.new_rank:<2}  {m.retained:>8.4f}  {m.rel_error:>10.4f}")
    if len(result.modules) > rows:
        lines.append(f"... {len(result.modules) - rows} more")
    mean = sum(m.retained for m in result.modules) / max(1, len(result.modules))
    low = min((m.retained for m in result.modules), default=1.0)
    lines.append(f"summary: {len(result.modules)} modules, retained energy mean {mean:.4f}, min {low:.4f}")
    return "\n".join(lines)
