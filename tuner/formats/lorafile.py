"""Save and load LoRA/LoCon files: the one entry point the trainer and the CLI use.

Saving always writes the kohya format (FORMATS.md §0: the file every tool loads), with hashes added to
the metadata and an atomic write. Loading reads kohya files and the diffusers/PEFT namings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import torch

from tuner.adapters.types import LoraWeights
from tuner.errors import FormatError
from tuner.formats.common import listing
from tuner.formats.detect import KOHYA_FORMATS, PEFT_FORMATS, detect_format
from tuner.formats.io import read_safetensors, save_safetensors
from tuner.formats.kohya import from_kohya_state_dict, to_kohya_state_dict
from tuner.formats.metadata import finalize_lora_file
from tuner.formats.peft import ADAPTER_METADATA_KEY, from_peft_state_dict
from tuner.models.families import Family

log = logging.getLogger(__name__)


def save_lora(
    path: str | os.PathLike[str],
    weights: LoraWeights,
    family: Family,
    *,
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``weights`` as a kohya LoRA file for ``family`` and return its ``sshs_model_hash``.

    ``metadata`` (default: ``weights.metadata``) is normally :func:`~tuner.formats.metadata.build_lora_metadata`'s
    result; the hashes are computed on the tensors as written (in ``dtype``) and added. The write is
    atomic (:func:`~tuner.formats.io.save_safetensors`).
    """
    tensors = to_kohya_state_dict(weights, family, dtype=dtype)
    final = finalize_lora_file(tensors, weights.metadata if metadata is None else metadata)
    save_safetensors(path, tensors, final)
    return final["sshs_model_hash"]


def load_lora(
    path: str | os.PathLike[str], *, name_table: Mapping[str, str] | None = None, lenient: bool = False
) -> LoraWeights:
    """Read a kohya or diffusers/PEFT LoRA file; the file's metadata goes to ``LoraWeights.metadata``.

    kohya files flatten module paths, so they need ``name_table`` (kohya name -> canonical key, from
    :func:`~tuner.formats.kohya.kohya_name_table` with the target model's module keys); ``ValueError``
    without it. ``lenient`` skips (and logs) kohya keys that fit no module instead of failing.
    Other recognised formats (LyCORIS, DoRA, embeddings) are a :class:`FormatError` saying so.
    """
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, {k: tuple(v.shape) for k, v in tensors.items()})
    if fmt in KOHYA_FORMATS:
        if name_table is None:
            raise ValueError(
                f"{path}: kohya files name modules by flattened paths; pass name_table="
                "kohya_name_table(family, <canonical module keys of the model>) to resolve them"
            )
        weights, ignored = from_kohya_state_dict(tensors, name_table, lenient=lenient)
        if ignored:
            log.warning(
                "%s", listing(f"{path}: ignored {len(ignored)} key(s) that fit no module", ignored, 8)
            )
    elif fmt in PEFT_FORMATS:
        weights = from_peft_state_dict(tensors, adapter_metadata=_adapter_metadata(path, metadata))
    else:
        raise FormatError(f"{path}: this is a {fmt} file, which load_lora does not read (yet)")
    weights.metadata = dict(metadata)
    return weights


def _adapter_metadata(path: str | os.PathLike[str], metadata: Mapping[str, str]) -> dict[str, object] | None:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        decoded = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: metadata {ADAPTER_METADATA_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(decoded, dict):
        raise FormatError(f"{path}: metadata {ADAPTER_METADATA_KEY!r} is not a JSON object")
    return decoded
