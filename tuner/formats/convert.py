"""``tuner convert``: rewrite a LoRA or embedding file in another tool's layout, tensors unchanged.

LoRA files (any format :func:`~tuner.formats.lorafile.load_lora` reads) go to:

* ``kohya``: FORMATS.md §0's export (diffusers-derived UNet names for SD1, so SD1 files with LDM-derived
  names, which diffusers and kohya cannot read, come out readable by every tool; ``lora_te_``; 0-dim
  alphas).
* ``peft``: ``<component>.<path>.lora_A.weight`` / ``lora_B.weight`` (what ``save_lora_weights`` writes);
* ``diffusers``: the same with diffusers' saved naming (``to_q.lora.down.weight``,
  ``q_proj.lora_linear_layer.up.weight``), as its training scripts write after
  ``convert_state_dict_to_diffusers``.

PEFT/diffusers files have no alpha tensor and their loaders assume ``lora_alpha = r``, so the scale
``alpha / r`` is baked into ``lora_B`` (FORMATS.md §3.1). The original alphas (and the source dtype) are
recorded in the ``tuner`` metadata block under ``"baked_alphas"``, so converting back to kohya restores
``alpha`` and ``lora_up = lora_B / scale``: a kohya -> peft -> kohya round trip gives identical tensors.
When a non-unit scale is baked into fp16/bf16 factors, the file is written in fp32 (unless a dtype is
asked for) so that nothing is rounded twice. All other metadata is carried over; hashes are recomputed.

Embedding files (:func:`~tuner.formats.embeddings.read_embedding`) go to ``kohya`` (``emb_params``, or
``clip_l``/``clip_g`` for SDXL), ``diffusers`` (``{token: vectors}``; SDXL: two files, the second with
``_2`` in its name, one per text encoder as diffusers loads them) or ``a1111-pt`` (A1111's ``.pt`` dict;
SDXL: ``{"clip_l", "clip_g"}``).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuner.adapters.lycoris import kind_of
from tuner.adapters.types import LoraModule, LoraWeights, split_key
from tuner.errors import TunerError
from tuner.formats.detect import (
    EMBEDDING_FORMATS,
    KOHYA_FORMATS,
    LYCORIS_FORMATS,
    detect_family,
    detect_format,
)
from tuner.formats.embeddings import (
    PICKLE_SUFFIXES,
    build_embedding_metadata,
    read_embedding,
    save_a1111_pt,
    save_diffusers_embedding,
    save_kohya_embedding,
)
from tuner.formats.io import SAVE_DTYPES, read_header, save_safetensors, write_bytes_atomic
from tuner.formats.kohya import to_kohya_state_dict
from tuner.formats.lorafile import load_lora
from tuner.formats.metadata import (
    MINIMUM_SS_KEYS,
    TUNER_KEY,
    build_lora_metadata,
    finalize_lora_file,
    read_tuner_block,
)
from tuner.formats.peft import ADAPTER_METADATA_KEY, PEFT_METADATA
from tuner.formats.skeleton import kohya_table_for
from tuner.models.families import FAMILIES, SD15, TINY, Family, get_family

LORA_TARGETS = ("kohya", "diffusers", "peft")
EMBEDDING_TARGETS = ("kohya", "diffusers", "a1111-pt")
BAKED_KEY = "baked_alphas"
_DTYPE_NAMES = {v: k for k, v in SAVE_DTYPES.items()}


@dataclass
class ConvertResult:
    """What :func:`convert_file` wrote: ``outputs`` (paths), the formats, module count and notes for the user."""

    source_format: str
    target: str
    outputs: list[Path]
    modules: int = 0
    notes: list[str] = field(default_factory=list)


def convert_file(
    path: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    family: str | None = None,
    dtype: str | None = None,
    token: str | None = None,
    lenient: bool = False,
) -> ConvertResult:
    """Convert the LoRA or embedding file ``path`` to layout ``to``, written atomically to ``out``.

    ``family`` (a family name) overrides the one detected from metadata/tensor widths; ``dtype``
    (``fp16``/``bf16``/``fp32``) the output dtype (default: the source's); ``token`` the embedding's token.
    """
    p = Path(path)
    if not p.is_file():
        raise TunerError(f"convert: '{p}' does not exist" if not p.exists() else f"convert: '{p}' is not a file")
    if Path(out).resolve() == p.resolve():
        raise TunerError(f"convert: --out '{out}' is the input file; write to a new file")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise TunerError(f"convert: unknown dtype {dtype!r}; choose from {', '.join(SAVE_DTYPES)}")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return convert_embedding(p, to, out, token=token, dtype=dtype)
    metadata, header = read_header(p)
    shapes = {k: shape for k, (_, shape) in header.items()}
    fmt = detect_format(header, shapes)
    if fmt in EMBEDDING_FORMATS:
        return convert_embedding(p, to, out, token=token, dtype=dtype)
    if fmt == "kohya-bundle":
        raise TunerError(
            f"convert: '{p}' bundles a LoRA with embeddings (bundle_emb.*). Convert the embedding with "
            f"`tuner convert {p} --token NAME --to kohya --out NAME.safetensors` after saving it alone, or "
            "use the plain LoRA file tuner writes beside a bundle"
        )
    return convert_lora(p, to, out, family=family, dtype=dtype, lenient=lenient)


# ---------------------------------------------------------------- LoRA


def read_lora_file(
    path: str | os.PathLike[str], *, family: str | None = None, lenient: bool = False
) -> tuple[LoraWeights, Family, str]:
    """``(weights, family, source format)`` of any LoRA file, without a base model.

    The family comes from ``family`` or the file (metadata, then tensor widths); kohya names resolve
    against the family's module names (:mod:`tuner.formats.skeleton`). A PEFT/diffusers file that
    tuner wrote with baked scales gets its original alphas and factors back (module docstring).
    """
    metadata, header = read_header(path)
    shapes = {k: shape for k, (_, shape) in header.items()}
    fmt = detect_format(header, shapes)
    name = family or detect_family(metadata, shapes)
    if name is None:
        raise TunerError(
            f"'{path}': cannot tell which model family this LoRA is for (no metadata, no text-encoder or "
            f"cross-attention module to measure); pass --family ({', '.join(sorted(FAMILIES))})"
        )
    fam = get_family(name)
    kohya_named = fmt in KOHYA_FORMATS or (fmt in LYCORIS_FORMATS and all(k.startswith("lora_") for k in header))
    table = kohya_table_for(fam) if kohya_named else None
    weights = load_lora(path, name_table=table, lenient=lenient)
    _unbake(weights)
    return weights, fam, fmt


def convert_lora(
    path: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    family: str | None = None,
    dtype: str | None = None,
    lenient: bool = False,
) -> ConvertResult:
    """Convert a LoRA file (see :func:`convert_file`)."""
    if to not in LORA_TARGETS:
        raise TunerError(f"convert: a LoRA converts to {', '.join(LORA_TARGETS)}, not {to!r}")
    weights, fam, fmt = read_lora_file(path, family=family, lenient=lenient)
    others = sorted({kind_of(m) for m in weights.modules.values() if not isinstance(m, LoraModule)})
    if others:
        raise TunerError(
            f"convert: '{path}' holds {', '.join(others)} modules; convert writes plain LoRA layouts only. "
            "Merge it into a base instead (`tuner merge --base BASE --lora FILE --out DIR`)"
        )
    if not weights.modules:
        raise TunerError(f"convert: '{path}' has no LoRA module left to write")
    recorded = _recorded_dtype(weights)
    source_dtype = recorded or next(iter(weights.modules.values())).up.dtype
    out_dtype = SAVE_DTYPES[dtype] if dtype else source_dtype
    notes: list[str] = []
    meta = {k: v for k, v in weights.metadata.items() if k != ADAPTER_METADATA_KEY}
    block = read_tuner_block(meta) or {}
    block.pop(BAKED_KEY, None)
    block["converted_from"] = fmt
    if to == "kohya":
        meta.pop("format", None)
        tensors = to_kohya_state_dict(weights, fam, dtype=out_dtype)
        missing = [k for k in MINIMUM_SS_KEYS if k not in meta]
        if missing:
            meta = {**_kohya_defaults(weights, fam, Path(out).stem), **meta}
            notes.append("added kohya's minimum metadata (ss_network_*, ss_base_model_version, modelspec.*)")
    else:
        scaled = [m for m in weights.modules.values() if m.alpha != m.rank]
        if scaled and dtype is None and out_dtype in (torch.float16, torch.bfloat16):
            out_dtype = torch.float32
            notes.append("alpha/rank baked into lora_B in fp32 (pass --save-dtype to choose)")
        tensors = _peft_tensors(weights, out_dtype, diffusers_names=to == "diffusers")
        if scaled:
            block[BAKED_KEY] = _baked_record(weights, source_dtype)
        meta.update(PEFT_METADATA)
    block.setdefault("version", 1)
    block.setdefault("family", fam.name)
    meta[TUNER_KEY] = json.dumps(block, sort_keys=True)
    final = finalize_lora_file(tensors, meta)
    save_safetensors(out, tensors, final)
    return ConvertResult(fmt, to, [Path(out)], len(weights.modules), notes)


def _peft_tensors(weights: LoraWeights, dtype: torch.dtype, *, diffusers_names: bool) -> dict[str, torch.Tensor]:
    """PEFT-named tensors with ``alpha / r`` baked into ``lora_B`` (computed in fp32)."""
    state: dict[str, torch.Tensor] = {}
    for key, module in weights.modules.items():
        component, path = split_key(key)
        up = module.up.detach().float()
        if module.alpha != module.rank:
            up = up * module.scale
        state[f"{component}.{path}.lora_A.weight"] = module.down.detach().to(dtype).contiguous()
        state[f"{component}.{path}.lora_B.weight"] = up.to(dtype).contiguous()
    if diffusers_names:
        state = {_diffusers_name(k): v for k, v in state.items()}
    return state


# diffusers' PEFT_TO_DIFFUSERS renames (utils/state_dict_utils.py): UNet attention projections and the
# text encoder's self-attention projections; every other module keeps lora_A/lora_B.
_DIFFUSERS_RENAMES = tuple(
    [(f"{p}.lora_{ab}.", f"{p}.lora.{ud}.") for p in ("to_q", "to_k", "to_v", "to_out.0")
     for ab, ud in (("A", "down"), ("B", "up"))]
    + [(f".{p}.lora_{ab}.", f".{p}.lora_linear_layer.{ud}.") for p in ("q_proj", "k_proj", "v_proj", "out_proj")
       for ab, ud in (("A", "down"), ("B", "up"))]
)


def _diffusers_name(key: str) -> str:
    """A PEFT key in diffusers' saved naming (what ``convert_state_dict_to_diffusers`` writes)."""
    for old, new in _DIFFUSERS_RENAMES:
        if old in key:
            return key.replace(old, new)
    return key


def _baked_record(weights: LoraWeights, source_dtype: torch.dtype) -> dict[str, Any]:
    """``{"alpha": most common alpha, "modules": {key: alpha} for the others, "dtype": source dtype}``."""
    alphas = [m.alpha for m in weights.modules.values()]
    common = max(set(alphas), key=alphas.count)
    return {
        "alpha": common,
        "modules": {k: m.alpha for k, m in weights.modules.items() if m.alpha != common},
        "dtype": _DTYPE_NAMES.get(source_dtype, "fp32"),
    }


def _unbake(weights: LoraWeights) -> None:
    """Undo :func:`_peft_tensors`' baking when tuner's record says it was done (in place)."""
    record = (read_tuner_block(weights.metadata) or {}).get(BAKED_KEY)
    if not isinstance(record, dict) or not all(isinstance(m, LoraModule) for m in weights.modules.values()):
        return
    special = record.get("modules") or {}
    for key, module in weights.modules.items():
        alpha = float(special.get(key, record.get("alpha", module.rank)))
        if alpha != module.rank and module.alpha == module.rank:  # baked: up holds up * alpha / r
            module.up = module.up.float() / (alpha / module.rank)
            module.alpha = alpha


def _recorded_dtype(weights: LoraWeights) -> torch.dtype | None:
    record = (read_tuner_block(weights.metadata) or {}).get(BAKED_KEY)
    name = record.get("dtype") if isinstance(record, dict) else None
    return SAVE_DTYPES.get(name) if isinstance(name, str) else None


def _kohya_defaults(weights: LoraWeights, family: Family, output_name: str) -> dict[str, str]:
    """kohya's minimum keys and modelspec for a file that came without them (e.g. from diffusers)."""
    ranks = [m.rank for m in weights.modules.values()]
    alphas = [m.alpha for m in weights.modules.values()]
    meta = build_lora_metadata(
        family=family, rank=max(set(ranks), key=ranks.count), alpha=max(set(alphas), key=alphas.count),
        output_name=output_name,
    )
    meta.pop(TUNER_KEY, None)
    return meta


# ---------------------------------------------------------------- embeddings


def convert_embedding(
    path: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    token: str | None = None,
    dtype: str | None = None,
) -> ConvertResult:
    """Convert an embedding file (see :func:`convert_file`); vectors are written in ``dtype`` (default fp32,
    the dtype :func:`~tuner.formats.embeddings.read_embedding` returns)."""
    if to not in EMBEDDING_TARGETS:
        raise TunerError(f"convert: an embedding converts to {', '.join(EMBEDDING_TARGETS)}, not {to!r}")
    data = read_embedding(path, token)
    cast = SAVE_DTYPES[dtype] if dtype else torch.float32
    vectors = {k: v.to(cast) for k, v in data.vectors.items()}
    out_path = Path(out)
    outputs = [out_path]
    notes: list[str] = []
    if to == "kohya":
        meta = _embedding_metadata(data.metadata, vectors, data.token)
        if data.is_sdxl:
            save_safetensors(out_path, {"clip_l": vectors["clip_l"], "clip_g": vectors["clip_g"]}, meta)
        else:
            (single,) = vectors.values()
            save_kohya_embedding(out_path, single, meta)
        if out_path.stem != data.token:
            notes.append(f"A1111, ComfyUI and kohya use the file name as the prompt word: this file is "
                         f"'{out_path.stem}', not '{data.token}'")
    elif to == "diffusers":
        if data.is_sdxl:
            second = out_path.with_name(f"{out_path.stem}_2{out_path.suffix}")
            save_diffusers_embedding(out_path, data.token, vectors["clip_l"])
            save_diffusers_embedding(second, data.token, vectors["clip_g"])
            outputs.append(second)
            notes.append(f"SDXL: {out_path.name} is for text_encoder (clip_l), {second.name} for text_encoder_2")
        else:
            (single,) = vectors.values()
            save_diffusers_embedding(out_path, data.token, single)
    else:
        step = int(data.metadata["step"]) if data.metadata.get("step", "").isdigit() else 0
        if data.is_sdxl:
            buffer = io.BytesIO()
            torch.save({"clip_l": vectors["clip_l"].clone(), "clip_g": vectors["clip_g"].clone()}, buffer)
            write_bytes_atomic(out_path, buffer.getvalue())
        else:
            (single,) = vectors.values()
            save_a1111_pt(out_path, data.token, single, step, sd_checkpoint=data.metadata.get("sd_checkpoint"),
                          sd_checkpoint_name=data.metadata.get("sd_checkpoint_name"))
    return ConvertResult(f"embedding-{data.format}", to, outputs, 0, notes)


def _embedding_metadata(source: dict[str, str], vectors: dict[str, torch.Tensor], token: str) -> dict[str, str]:
    """The source's modelspec/ss/tuner metadata if it has some, else tuner's for the family the width implies."""
    kept = {k: v for k, v in source.items() if k.startswith(("modelspec.", "ss_", TUNER_KEY))}
    if kept:
        return kept
    width = int(next(iter(vectors.values())).shape[1])
    family = {SD15.text_encoders[0].hidden_size: SD15, TINY.text_encoders[0].hidden_size: TINY}.get(width)
    if family is None or len(vectors) != 1:
        return {}
    n = int(next(iter(vectors.values())).shape[0])
    return build_embedding_metadata(family=family, token=token, n_vectors=n)
