"""``tuner extract``: a LoRA/LoCon that approximates ``tuned - base`` (a DreamBooth or fine-tuned model
turned into a shareable adapter), by truncated SVD of each module's weight difference.

The approach is kohya's ``networks/extract_lora_from_models.py`` (FORMATS.md §7), implemented here:

* modules: every UNet Linear/Conv2d that one of tuner's LoRA presets can target (the ``locon`` set, which
  holds all the others: attention, feed-forward, ``proj_in/out``, ResNet ``time_emb_proj`` and
  ``conv_shortcut``, down/up-sampler convs) and the text encoder's q/k/v/out and fc1/fc2; 3x3 convs only
  when ``conv_rank`` is given (as kohya's ``conv_dim``). Unlike kohya without ``conv_dim``, the Linear
  ``time_emb_proj`` and 1x1 ``conv_shortcut`` are always candidates: a fine-tune changes them too, and every
  loader reads them;
* a text encoder is kept only if some module differs by more than ``min_diff`` somewhere (kohya's rule:
  fine-tuning often leaves the text encoder untouched up to noise);
* factors as :func:`tuner.adapters.svd.low_rank` computes them, ``alpha = rank`` of each module (scale 1);
* modules whose difference is exactly zero are skipped and counted.

Two identical models give an *empty* :class:`ExtractResult` (``is_empty``), which describes itself;
:func:`save_extracted` refuses to write it (a LoRA file without modules loads nowhere), so ``tuner extract``
on identical models exits with an error and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.adapters.lora import UNET_PRESETS, canonical_path, text_encoder_targets, unet_targets
from tuner.adapters.svd import DEFAULT_CLAMP_QUANTILE, as_matrix, low_rank
from tuner.adapters.types import LoraModule, LoraWeights
from tuner.errors import TunerError
from tuner.formats.io import SAVE_DTYPES  # noqa: F401  (the CLI and tests read the choices here)
from tuner.formats.lorafile import save_lora
from tuner.formats.metadata import build_lora_metadata
from tuner.models.base import BaseModel
from tuner.models.families import Family

WORST_IN_SUMMARY = 5


@dataclass(frozen=True)
class ModuleReport:
    """How well one module's difference is captured. ``retained``: fraction of ``||delta||_F^2`` kept by
    the truncated SVD; ``rel_error``: ``||delta - up @ down||_F / ||delta||_F`` of the factors as stored
    in memory (fp32, after clamping)."""

    key: str
    rank: int
    retained: float
    rel_error: float
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExtractSummary:
    """Totals of an extraction; the retained/error figures are None when nothing was extracted."""

    modules: int
    zero: int
    left_out: int
    mean_retained: float | None
    min_retained: float | None
    max_rel_error: float | None
    worst: tuple[ModuleReport, ...]


@dataclass
class ExtractResult:
    """An extracted adapter and its report.

    ``weights``: canonical keys -> factors (``alpha = rank``). ``reports``: one per extracted module, in
    model order. ``zero``: canonical keys of candidate modules with an exactly zero difference (skipped).
    ``left_out``: changed tensors the LoRA does not carry (biases, norms, ``conv_in``/``conv_out``,
    embeddings, 3x3 convs without ``conv_rank``, a dropped text encoder), as ``component:parameter``.
    ``convs_left_out``: the changed 3x3 convs among them (``conv_rank`` would include them).
    ``text_encoders``: component -> ``"extracted"``, ``"not requested"`` or why it was dropped.
    """

    weights: LoraWeights
    family: Family
    base_source: str
    tuned_source: str
    rank: int
    conv_rank: int | None
    min_diff: float
    clamp_quantile: float | None
    prediction_type: str | None = None
    reports: list[ModuleReport] = field(default_factory=list)
    zero: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    convs_left_out: list[str] = field(default_factory=list)
    text_encoders: dict[str, str] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.weights.modules

    def worst(self, n: int | None = None) -> list[ModuleReport]:
        """Reports sorted worst first (least retained energy, then largest relative error)."""
        ranked = sorted(self.reports, key=lambda r: (r.retained, -r.rel_error, r.key))
        return ranked if n is None else ranked[:n]

    @property
    def summary(self) -> ExtractSummary:
        retained = [r.retained for r in self.reports]
        return ExtractSummary(
            modules=len(self.reports),
            zero=len(self.zero),
            left_out=len(self.left_out),
            mean_retained=sum(retained) / len(retained) if retained else None,
            min_retained=min(retained) if retained else None,
            max_rel_error=max(r.rel_error for r in self.reports) if self.reports else None,
            worst=tuple(self.worst(WORST_IN_SUMMARY)),
        )


def check_extract_paths(base: str, tuned: str, out: str | os.PathLike[str]) -> None:
    """Fail fast (:class:`TunerError`, before any model loads) on a ``--base``/``--tuned`` path that does
    not exist (``tiny`` is always valid) and on an ``--out`` that is not a ``.safetensors`` file name or
    whose folder is a file."""
    for option, spec in (("--base", base), ("--tuned", tuned)):
        if spec != "tiny" and not Path(spec).expanduser().exists():
            raise TunerError(
                f"{option} '{spec}' does not exist: pass 'tiny' or a local diffusers folder "
                "(with unet/, vae/, text_encoder/, tokenizer/, scheduler/); tuner never downloads"
            )
    target = Path(out)
    if target.suffix != ".safetensors":
        raise TunerError(f"--out '{out}': name the output file NAME.safetensors")
    if target.is_dir():
        example = target / "extracted.safetensors"
        raise TunerError(f"--out '{out}' is a folder; pass a file name such as {example}")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise TunerError(f"--out '{out}': '{parent}' is a file, not a folder")


def check_compatible(base: BaseModel, tuned: BaseModel) -> None:
    """Refuse (:class:`TunerError`) models of different families or whose UNet/text-encoder parameters
    differ in name or shape, naming the first differing parameter."""
    if base.family.name != tuned.family.name:
        raise TunerError(
            f"the base '{base.source}' is a {base.family.name} model but the tuned model '{tuned.source}' is "
            f"{tuned.family.name}; pass the base the tuned model was trained from"
        )
    for component, base_model, tuned_model in _components(base, tuned):
        a = {n: tuple(p.shape) for n, p in base_model.named_parameters()}
        b = {n: tuple(p.shape) for n, p in tuned_model.named_parameters()}
        for name in [*a, *(n for n in b if n not in a)]:
            if a.get(name) != b.get(name):
                raise TunerError(
                    f"the models do not match: {component}:{name} is {_shape(a.get(name))} in the base "
                    f"'{base.source}' but {_shape(b.get(name))} in the tuned model '{tuned.source}'; "
                    "pass the base the tuned model was trained from"
                )


@torch.no_grad()
def extract_lora(
    base: BaseModel,
    tuned: BaseModel,
    *,
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = 0.01,
    text_encoder: bool = True,
    clamp_quantile: float | None = DEFAULT_CLAMP_QUANTILE,
    device: str | torch.device = "cpu",
) -> ExtractResult:
    """A LoRA approximating ``tuned - base`` (module docstring), with its report; neither model is changed.

    ``rank`` applies to Linear and 1x1-conv modules, ``conv_rank`` to 3x3 convs (left out when None);
    each is clamped to the module's size. ``min_diff`` applies to text encoders only (kohya's rule).
    ``clamp_quantile``: see :func:`~tuner.adapters.svd.low_rank` (None = exact truncated SVD). The SVDs
    run on ``device``; the factors are returned on the CPU in fp32.

    Raises :class:`TunerError` for mismatched models (:func:`check_compatible`), ranks below 1, a negative
    ``min_diff`` or a difference holding NaN/inf.
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise TunerError(f"rank {rank} / conv rank {conv_rank}: ranks must be at least 1")
    if min_diff < 0:
        raise TunerError(f"min_diff {min_diff}: must be 0 or more")
    check_compatible(base, tuned)
    result = ExtractResult(
        weights=LoraWeights(),
        family=base.family,
        base_source=base.source,
        tuned_source=tuned.source,
        rank=rank,
        conv_rank=conv_rank,
        min_diff=min_diff,
        clamp_quantile=clamp_quantile,
        prediction_type=base.prediction_type,
    )
    carried: set[str] = set()  # component:parameter of every candidate weight (extracted or zero)
    for component, base_model, tuned_model in _components(base, tuned):
        if component != "unet":
            if not text_encoder:
                result.text_encoders[component] = "not requested"
                continue
            modules = _candidates(component, base_model, tuned_model)
            largest = max((_diff(b, t, device).abs().max().item() for _, _, b, t in modules), default=0.0)
            if largest <= min_diff:
                why = f"dropped: largest |diff| {largest:.3g} <= min_diff {min_diff:g}"
                result.text_encoders[component] = why
                continue
            result.text_encoders[component] = "extracted"
        for key, path, b, t in _candidates(component, base_model, tuned_model):
            target_rank = rank
            if b.ndim == 4 and tuple(b.shape[2:]) != (1, 1):  # a kxk conv
                if conv_rank is None:
                    if not torch.equal(b, t):
                        result.convs_left_out.append(key)
                    continue
                target_rank = conv_rank
            carried.add(f"{component}:{path}.weight")
            delta = _diff(b, t, device)
            if not bool(delta.any()):
                result.zero.append(key)
                continue
            module, report = _factor(key, delta, target_rank, clamp_quantile)
            result.weights.modules[key] = module
            result.reports.append(report)
    result.left_out = _changed_elsewhere(base, tuned, carried)
    return result


def save_extracted(
    path: str | os.PathLike[str], result: ExtractResult, *, dtype: torch.dtype = torch.float16
) -> str:
    """Write ``result`` as a kohya LoRA file (atomically) with its metadata; returns ``sshs_model_hash``.

    Metadata: kohya's keys (``ss_network_dim`` = rank, ``ss_network_alpha`` = rank, ``ss_network_args``
    with ``conv_dim``/``conv_alpha`` when 3x3 convs were extracted, ``ss_training_comment`` saying what was
    extracted from what), ``modelspec.*`` and the tuner block (``method = "extract"``, sources, ranks, the
    retained-energy summary). Missing parent folders are created. :class:`TunerError` for an empty result
    (identical models): nothing is written.
    """
    if result.is_empty:
        raise TunerError(_empty_reason(result) + "; no file written")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    summary = result.summary
    conv = f", conv rank {result.conv_rank}" if result.conv_rank is not None else ""
    comment = f"extracted from {result.tuned_source} minus {result.base_source} at rank {result.rank}{conv}"
    network_args: dict[str, object] | None = None
    if result.conv_rank is not None:
        network_args = {"conv_dim": result.conv_rank, "conv_alpha": float(result.conv_rank)}
    metadata = build_lora_metadata(
        family=result.family,
        rank=result.rank,
        alpha=float(result.rank),
        output_name=Path(path).stem,
        network_args=network_args,
        training={"ss_training_comment": comment, "ss_sd_model_name": Path(result.base_source).name},
        tuner_block={
            "method": "extract",
            "base": result.base_source,
            "tuned": result.tuned_source,
            "rank": result.rank,
            "conv_rank": result.conv_rank,
            "min_diff": result.min_diff,
            "clamp_quantile": result.clamp_quantile,
            "text_encoders": result.text_encoders,
            "modules": summary.modules,
            "mean_retained": round(summary.mean_retained or 0.0, 6),
            "min_retained": round(summary.min_retained or 0.0, 6),
        },
        description=comment,
        prediction_type=result.prediction_type,
    )
    return save_lora(path, result.weights, result.family, dtype=dtype, metadata=metadata)


def format_report(result: ExtractResult, rows: int = 10) -> str:
    """The per-module table (worst ``rows`` first, then how many more) and the summary, for the CLI."""
    head = (
        f"extract: '{result.tuned_source}' minus '{result.base_source}' at rank {result.rank}"
        + (f", conv rank {result.conv_rank}" if result.conv_rank is not None else ", 3x3 convs left out")
        + " (alpha = rank, scale 1)"
    )
    lines = [head]
    if result.is_empty:
        lines.append(_empty_reason(result))
    else:
        width = max(len(r.key) for r in result.reports)
        lines.append(f"{'module':<{width}}  rank  retained  rel. error")
        for r in result.worst(rows):
            lines.append(f"{r.key:<{width}}  {r.rank:>4}  {r.retained:>8.4f}  {r.rel_error:>10.4f}")
        if len(result.reports) > rows:
            lines.append(f"... {len(result.reports) - rows} more")
        s = result.summary
        lines.append(
            f"summary: {s.modules} modules extracted, retained energy mean {s.mean_retained:.4f}, "
            f"min {s.min_retained:.4f}; largest relative error {s.max_rel_error:.4f}"
        )
    if result.zero:
        lines.append(f"skipped {len(result.zero)} module(s) whose difference is exactly zero")
    for component, status in result.text_encoders.items():
        lines.append(f"{component}: {status}")
    if result.convs_left_out:
        n = len(result.convs_left_out)
        lines.append(f"{n} changed 3x3 conv(s) left out: pass --conv-rank to include them")
    if result.left_out:
        shown = ", ".join(result.left_out[:3]) + (", ..." if len(result.left_out) > 3 else "")
        n = len(result.left_out)
        lines.append(f"not in the LoRA: {n} changed tensor(s) a LoRA does not carry ({shown})")
    return "\n".join(lines)


def _empty_reason(result: ExtractResult) -> str:
    if result.left_out:
        hints = ["pass --conv-rank to include 3x3 convs"] if result.convs_left_out else []
        if any(status.startswith("dropped") for status in result.text_encoders.values()):
            hints.append("lower --min-diff to keep the text encoder")
        return (
            f"nothing to extract: '{result.tuned_source}' differs from '{result.base_source}' only in "
            f"tensors this extraction leaves out ({len(result.left_out)}, e.g. {result.left_out[0]})"
            + "".join(f"; {hint}" for hint in hints)
        )
    return (
        f"nothing to extract: '{result.tuned_source}' and '{result.base_source}' have identical weights "
        f"({len(result.zero)} candidate modules compared)"
    )


def _shape(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else f"shape {list(shape)}"


def _components(base: BaseModel, tuned: BaseModel) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    yield "unet", base.unet, tuned.unet
    for component, model in base.text_encoders.items():
        yield component, model, tuned.text_encoders[component]


def _candidates(
    component: str, base_model: nn.Module, tuned_model: nn.Module
) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(canonical key, live path, base weight, tuned weight) of every module a LoRA preset can target."""
    if component == "unet":
        chosen = set().union(*(unet_targets(base_model, preset) for preset in UNET_PRESETS))
        paths = [n for n, _ in base_model.named_modules() if n in chosen]
    else:
        paths = text_encoder_targets(base_model)
    for path in paths:
        yield (
            f"{component}:{canonical_path(component, path)}",
            path,
            _weight(base_model, path),
            _weight(tuned_model, path),
        )


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    weight = model.get_submodule(path).weight
    if not isinstance(weight, torch.Tensor):  # unet_targets/text_encoder_targets only name Linear/Conv2d
        raise TypeError(f"module {path!r} has no weight tensor")
    return weight


def _factor(
    key: str, delta: torch.Tensor, rank: int, clamp_quantile: float | None
) -> tuple[LoraModule, ModuleReport]:
    """One module's factors (CPU, fp32, alpha = rank) and its report."""
    try:
        up, down, retained = low_rank(delta, rank, clamp_quantile=clamp_quantile)
    except ValueError as exc:
        raise TunerError(f"cannot extract {key}: {exc}") from None
    matrix = as_matrix(delta)
    residual = matrix - up.flatten(1) @ down.flatten(1)
    error = float(torch.linalg.matrix_norm(residual) / torch.linalg.matrix_norm(matrix))
    r = int(down.shape[0])
    module = LoraModule(down=down.cpu(), up=up.cpu(), alpha=float(r))
    return module, ModuleReport(key, r, retained, error, tuple(delta.shape))


def _diff(base_weight: torch.Tensor, tuned_weight: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return tuned_weight.to(device, torch.float32) - base_weight.to(device, torch.float32)


def _changed_elsewhere(base: BaseModel, tuned: BaseModel, carried: set[str]) -> list[str]:
    """``component:parameter`` of every changed parameter that is not a candidate weight."""
    changed = []
    for component, base_model, tuned_model in _components(base, tuned):
        tuned_params: Mapping[str, Any] = dict(tuned_model.named_parameters())
        for name, p in base_model.named_parameters():
            key = f"{component}:{name}"
            if key not in carried and not torch.equal(p, tuned_params[name]):
                changed.append(f"{component}:{canonical_path(component, name)}")
    return changed
