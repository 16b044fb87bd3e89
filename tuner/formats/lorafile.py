"""Save and load LoRA/LoCon files: the one entry point the trainer and the CLI use.

Saving always writes the kohya format (FORMATS.md §0: the file every tool loads), with hashes added to
the metadata and an atomic write. Loading reads kohya files, the diffusers/PEFT namings, LyCORIS LoHa/LoKr
and DoRA.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import torch

from tuner.adapters.lycoris import DoraModule
from tuner.adapters.types import LoraWeights
from tuner.errors import FormatError
from tuner.formats.common import listing
from tuner.formats.detect import KOHYA_FORMATS, LYCORIS_FORMATS, PEFT_FORMATS, detect_family, detect_format
from tuner.formats.io import read_safetensors, save_safetensors
from tuner.formats.kohya import KOHYA_PREFIXES, from_kohya_state_dict, to_kohya_state_dict
from tuner.formats.lycoris import from_lycoris_state_dict, split_magnitudes
from tuner.formats.metadata import finalize_lora_file
from tuner.formats.peft import ADAPTER_METADATA_KEY, from_peft_state_dict, parse_key
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
    path: str | os.PathLike[str],
    *,
    name_table: Mapping[str, str] | None = None,
    lenient: bool = False,
    family: Family | None = None,
) -> LoraWeights:
    """Read a LoRA file; the file's metadata goes to ``LoraWeights.metadata``.

    Formats: kohya LoRA/LoCon, diffusers/PEFT namings, LyCORIS LoHa/LoKr and DoRA (kohya-named, or PEFT's
    ``lora_magnitude_vector``); modules that are not plain LoRA come back as the types of
    :mod:`tuner.adapters.lycoris`. kohya-named files flatten module paths, so they need ``name_table``
    (kohya name -> canonical key, from :func:`~tuner.formats.kohya.kohya_name_table` with the target
    model's module keys); ``ValueError`` without it. Keys that fit no module are a :class:`FormatError`
    listing them, or with ``lenient`` a warning that counts them. With ``family``, a file whose metadata
    or tensor widths say it was made for another family is refused first, naming both (see
    :func:`check_family`). Embedding files are a :class:`FormatError` saying so.
    """
    tensors, metadata = read_safetensors(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    fmt = detect_format(tensors, shapes)
    if family is not None:
        check_family(path, metadata, shapes, family)
    ignored: list[str] = []
    peft_named = fmt == "dora" and not all(k.startswith(KOHYA_PREFIXES) for k in tensors)
    if fmt in PEFT_FORMATS or peft_named:
        weights = _read_peft(path, tensors, metadata)
    elif fmt in KOHYA_FORMATS or fmt in LYCORIS_FORMATS:
        if name_table is None:
            raise ValueError(
                f"{path}: kohya files name modules by flattened paths; pass name_table="
                "kohya_name_table(family, <canonical module keys of the model>) to resolve them"
            )
        if fmt in KOHYA_FORMATS:
            weights, ignored = from_kohya_state_dict(tensors, name_table, lenient=lenient)
        else:
            weights, ignored = from_lycoris_state_dict(tensors, name_table, lenient=lenient)
    else:
        raise FormatError(
            f"{path}: this is a {fmt} file, not a LoRA"
            + (" (use it with --embedding, or `tuner convert` it)" if fmt.startswith("embedding") else "")
        )
    if ignored:
        log.warning("%s", listing(f"{path}: ignored {len(ignored)} key(s) that fit no module (--lenient)",
                                  ignored, 8))
    weights.metadata = dict(metadata)
    return weights


def _read_peft(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
               ) -> LoraWeights:
    """diffusers/PEFT namings, with PEFT DoRA magnitudes wrapped around their modules."""
    rest, magnitudes = split_magnitudes(tensors)
    weights = from_peft_state_dict(rest, adapter_metadata=_adapter_metadata(path, metadata))
    for prefix, magnitude in magnitudes.items():
        parsed = parse_key(prefix + ".lora_A.weight")
        if parsed is None or parsed[0] not in weights.modules:
            raise FormatError(f"{path}: DoRA magnitude '{prefix}' has no LoRA module beside it")
        inner = weights.modules[parsed[0]]
        weights.modules[parsed[0]] = DoraModule(inner, magnitude.reshape(-1, *[1] * (inner.down.ndim - 1)))  # type: ignore[assignment]
    return weights


def family_group(name: str) -> str:
    """Families whose LoRAs are interchangeable share a group: ``sd15`` -> ``sd1``, ``sd2*`` -> ``sd2``,
    ``sdxl*`` -> ``sdxl``; any other name is its own group."""
    for prefix, group in (("sdxl", "sdxl"), ("sd2", "sd2"), ("sd1", "sd1")):
        if name.startswith(prefix):
            return group
    return name


def check_family(
    path: str | os.PathLike[str], metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], family: Family
) -> None:
    """Refuse a file made for another family than ``family`` (from its metadata and tensor widths, see
    :func:`~tuner.formats.detect.detect_family`), naming both; a file without evidence passes."""
    made_for = detect_family(metadata, shapes)
    if made_for == "sd15" and family.name == "tiny":
        return  # tiny files say sd_v1 too; without a width to tell, the shape check decides
    if made_for is not None and family_group(made_for) != family_group(family.name):
        raise FormatError(
            f"{path}: this LoRA was made for the {made_for} family, but the loaded base is {family.name} "
            f"({family.description}); use a {made_for} base, or a LoRA trained for {family.name}"
        )


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
