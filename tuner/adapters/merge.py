"""``tuner merge``: LoRAs into a base model's weights, or several LoRAs into one.

* **Into the base** (:func:`merge_into_base`): each file's delta, times its ratio, is added to the
  weights (the sampler's own merge: ``W + ratio * alpha/r * up @ down``, LoHa/LoKr/DoRA deltas likewise),
  and the result is written as a diffusers folder or one LDM-layout file. Its images equal sampling the
  base with the LoRAs applied at those ratios.
* **LoRA + LoRA by concatenation** (:func:`concat_loras`): per module, ``down = cat(down_i)`` (rows) and
  ``up = cat(c_i / s * up_i)`` (columns) with ``c_i = ratio_i * alpha_i / r_i``, ``s = |c_1|`` (the first
  file's) and ``alpha = s * sum(r_i)``. Then ``alpha/R * up @ down = sum_i c_i * up_i @ down_i``: the sum
  of the deltas, exactly (up to float rounding), at rank ``R = sum(r_i)``. A module in only some files
  keeps only their parts.
* **LoRA + LoRA by SVD** (:func:`merge_loras` with ``rank``): the concatenation, then the best rank-``k``
  approximation of each module's summed delta (the code of ``tuner resize``), with each module's retained
  energy and relative error reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuner.adapters.lycoris import kind_of
from tuner.adapters.resize import ALPHA, DOWN, UP, ModuleResize, resize_tensors
from tuner.adapters.types import LoraModule, LoraWeights
from tuner.errors import TunerError
from tuner.formats.io import SAVE_DTYPES, save_safetensors
from tuner.formats.kohya import to_kohya_state_dict
from tuner.formats.metadata import build_lora_metadata, finalize_lora_file
from tuner.models.base import BaseModel, export_base, load_base
from tuner.models.families import Family


@dataclass(frozen=True)
class MergeInput:
    """One LoRA file and the ratio (multiplier) it is merged with."""

    path: Path
    ratio: float = 1.0

    @classmethod
    def parse(cls, text: str) -> MergeInput:
        """``FILE`` or ``FILE:RATIO``, read as ``tuner sample --lora`` reads ``FILE:SCALE``."""
        from tuner.sample.generate import LoraSpec

        spec = LoraSpec.parse(text)
        return cls(spec.path, spec.scale)


def merge_into_base(
    base_spec: str, inputs: Sequence[MergeInput], out: str | os.PathLike[str], *, lenient: bool = False,
    single_file: bool = False, dtype: torch.dtype | None = torch.float16, base: BaseModel | None = None,
) -> tuple[Path, int]:
    """Load ``base_spec`` (``tiny``, a diffusers folder or a single file), merge every input at its ratio and
    write the result: a diffusers folder ``out`` (new or empty), or with ``single_file`` one LDM-layout
    ``.safetensors`` that A1111 and ComfyUI load (tensors in ``dtype``; None keeps fp32). Returns the path
    and the number of modules merged. ``base``: an already loaded base to merge into instead (it is changed)."""
    from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for

    if not inputs:
        raise TunerError("merge: give at least one --lora FILE[:RATIO]")
    _check_inputs(inputs)
    out = Path(out)
    if single_file:
        if out.suffix.lower() != ".safetensors":
            raise TunerError(f"merge: --format single-file writes one .safetensors file; '{out}' is not one")
        if out.exists():
            raise TunerError(f"merge: '{out}' exists; pass a new file name")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunerError(f"merge: output folder '{out}' exists and is not empty; pass a new folder")
    base = base if base is not None else load_base(base_spec)
    loaded = load_loras_for(base, [LoraSpec(i.path, i.ratio) for i in inputs], lenient=lenient)
    apply_loras(base, loaded, merge=True)
    modules = sum(len(lo.weights.modules) for lo in loaded)
    if single_file:
        from tuner.models.single_file import save_single_file

        return save_single_file(out, base.family, base.components, dtype=dtype,
                                prediction_type=base.prediction_type), modules
    return export_base(base, out), modules


def concat_loras(items: Sequence[tuple[LoraWeights, float]]) -> LoraWeights:
    """The exact sum of the LoRAs' deltas at their ratios, as one LoRA of the summed ranks (module
    docstring); factors in fp32. Inputs with ratio 0 are left out."""
    modules: dict[str, LoraModule] = {}
    keys = list(dict.fromkeys(k for weights, _ in items for k in weights.modules))
    for key in keys:
        parts = [(w.modules[key], ratio) for w, ratio in items if key in w.modules and ratio != 0]
        if not parts:
            continue
        s = abs(parts[0][1] * parts[0][0].scale)
        downs, ups = [], []
        for module, ratio in parts:
            if module.down.shape[1:] != parts[0][0].down.shape[1:] or module.up.shape[0] != parts[0][0].up.shape[0]:
                raise TunerError(
                    f"merge: module {key} has factors of different shapes in different files "
                    f"({tuple(parts[0][0].down.shape)} vs {tuple(module.down.shape)}); the files are for "
                    "different models"
                )
            factor = ratio * module.scale / s
            downs.append(module.down.detach().float())
            ups.append(module.up.detach().float() if factor == 1.0 else module.up.detach().float() * factor)
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        modules[key] = LoraModule(down=down, up=up, alpha=s * int(down.shape[0]))
    return LoraWeights(modules=modules)


@dataclass
class MergeLorasResult:
    """A merged LoRA file: ``path``, ``modules`` (count), the mode, and for SVD one report per module."""

    path: Path
    modules: int
    mode: str
    metadata: dict[str, str]
    reports: list[ModuleResize] = field(default_factory=list)

    def worst(self, n: int) -> list[ModuleResize]:
        return sorted(self.reports, key=lambda m: m.retained)[:n]


def merge_loras(
    inputs: Sequence[MergeInput],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    family: str | None = None,
    dtype: str | None = None,
    lenient: bool = False,
) -> MergeLorasResult:
    """Merge LoRA files into one kohya file ``out``: by concatenation (``rank`` None; exact) or by SVD to
    ``rank`` (``conv_rank`` for 3x3 convs). ``dtype`` (fp16/bf16/fp32) defaults to the inputs' common
    factor dtype, fp32 if they differ."""
    from tuner.formats.convert import read_lora_file

    if len(inputs) < 2 and rank is None:
        raise TunerError("merge: concatenating needs at least two --lora files (or pass --rank to re-factor one)")
    _check_inputs(inputs)
    loaded: list[tuple[LoraWeights, float]] = []
    families: dict[str, Family] = {}
    dtypes: set[torch.dtype] = set()
    for item in inputs:
        weights, fam, _ = read_lora_file(item.path, family=family, lenient=lenient)
        others = sorted({kind_of(m) for m in weights.modules.values() if not isinstance(m, LoraModule)})
        if others:
            raise TunerError(
                f"merge: '{item.path}' holds {', '.join(others)} modules; LoRA + LoRA merging takes plain "
                "LoRA/LoCon files (merge LyCORIS/DoRA files into a base with --base instead)"
            )
        families[str(item.path)] = fam
        dtypes.update(m.up.dtype for m in weights.modules.values())
        loaded.append((weights, item.ratio))
    if len({f.name for f in families.values()}) > 1:
        listed = ", ".join(f"{p} ({f.name})" for p, f in families.items())
        raise TunerError(f"merge: the LoRAs are for different model families: {listed}")
    fam = next(iter(families.values()))
    out_dtype = SAVE_DTYPES[dtype] if dtype else (dtypes.pop() if len(dtypes) == 1 else torch.float32)

    merged = concat_loras(loaded)
    if not merged.modules:
        raise TunerError("merge: nothing to merge (every ratio is 0)")
    tensors = to_kohya_state_dict(merged, fam, dtype=torch.float32)
    reports: list[ModuleResize] = []
    mode = "concat"
    if rank is not None:
        tensors, reports = resize_tensors(tensors, rank=rank, conv_rank=conv_rank)
        mode = f"svd rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "")
    tensors = {k: (v.to(out_dtype) if k.endswith((DOWN, UP)) else v) for k, v in tensors.items()}
    metadata = _metadata(tensors, fam, Path(out).stem, inputs, mode, loaded)
    final = finalize_lora_file(tensors, metadata)
    save_safetensors(out, tensors, final)
    return MergeLorasResult(Path(out), len(merged.modules), mode, final, reports)


def _metadata(
    tensors: dict[str, torch.Tensor], fam: Family, name: str, inputs: Sequence[MergeInput], mode: str,
    loaded: Sequence[tuple[LoraWeights, float]],
) -> dict[str, str]:
    names = [k[: -len(DOWN)] for k in tensors if k.endswith(DOWN)]
    ranks = [int(tensors[n + DOWN].shape[0]) for n in names]
    alphas = [float(tensors[n + ALPHA]) for n in names]
    sources = [
        {"file": i.path.name, "ratio": i.ratio, "sshs_model_hash": w.metadata.get("sshs_model_hash")}
        for i, (w, _) in zip(inputs, loaded)
    ]
    meta = build_lora_metadata(
        family=fam, rank=max(set(ranks), key=ranks.count), alpha=max(set(alphas), key=alphas.count),
        output_name=name, tuner_block={"method": "merge", "merge": {"mode": mode, "sources": sources}},
    )
    if len(set(ranks)) > 1:
        meta["ss_network_dim"] = "Dynamic"
    if len(set(alphas)) > 1:
        meta["ss_network_alpha"] = "Dynamic"
    meta["ss_training_comment"] = f"merged by tuner ({mode}) from " + json.dumps(
        [f"{s['file']}:{s['ratio']}" for s in sources]
    )
    meta["modelspec.merged_from"] = ", ".join(i.path.stem for i in inputs)
    return meta


def _check_inputs(inputs: Sequence[MergeInput]) -> None:
    for item in inputs:
        if not item.path.is_file():
            raise TunerError(f"merge: LoRA file '{item.path}' does not exist")


def format_merge_report(result: MergeLorasResult, rows: int = 10) -> str:
    """Per-module error of an SVD merge (worst first) and a summary; one line for a concatenation."""
    if not result.reports:
        dims = result.metadata.get("ss_network_dim")
        return f"concatenated {result.modules} modules (exact; rank {dims})"
    width = max(len(m.name) for m in result.reports)
    lines = [f"{'module':<{width}}  rank     retained  rel. error"]
    for m in result.worst(rows):
        lines.append(f"{m.name:<{width}}  {m.old_rank:>3}->{m.new_rank:<3}  {m.retained:>8.4f}  {m.rel_error:>10.4f}")
    if len(result.reports) > rows:
        lines.append(f"... {len(result.reports) - rows} more")
    errors = [m.rel_error for m in result.reports]
    lines.append(
        f"summary: {len(errors)} modules, relative error mean {sum(errors) / len(errors):.4f}, "
        f"max {max(errors):.4f}"
    )
    return "\n".join(lines)
