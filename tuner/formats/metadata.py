"""Metadata of exported LoRA files: kohya ``ss_*``, Stability ``modelspec.*``, tuner's own block, hashes.

FORMATS.md §2. Every value is a ``str`` (safetensors requires it; A1111 JSON-decodes values starting with
``{``, so nested data is stored as JSON text).

tuner's own block is **one key, ``"tuner"``, holding a JSON object** (not flat ``tuner.*`` keys): it nests
naturally (target lists, adapter settings), is written and replaced as a unit, and A1111 shows it decoded.
Its fields: ``"version"`` (layout version of the block, currently 1), ``"family"`` (tuner family name), and
whatever the trainer passes (``method``, ``targets``, ``recipe_hash``, adapter settings, ...).
:func:`read_tuner_block` reads it back.

Order of work when saving: :func:`build_lora_metadata` (everything except hashes), then
:func:`finalize_lora_file` on the exact tensors being written (adds ``sshs_model_hash``,
``sshs_legacy_hash`` and ``modelspec.hash_sha256``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import torch
from safetensors.torch import save

from tuner.formats.io import check_metadata, prepare_tensors
from tuner.models.families import Family

TUNER_KEY = "tuner"
TUNER_BLOCK_VERSION = 1
MODELSPEC_VERSION = "1.0.1"
NETWORK_MODULE = "networks.lora"

# kohya's SS_METADATA_MINIMUM_KEYS plus ss_output_name (FORMATS.md §0.5).
MINIMUM_SS_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_v2",
    "ss_base_model_version",
    "ss_output_name",
)
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")

_LEGACY_RANGE = (0x100000, 0x110000)


def build_lora_metadata(
    *,
    family: Family,
    rank: int,
    alpha: float,
    output_name: str,
    network_args: Mapping[str, object] | None = None,
    training: Mapping[str, str] | None = None,
    tuner_block: Mapping[str, Any] | None = None,
    title: str | None = None,
    trigger_words: Iterable[str] = (),
    resolution: int | tuple[int, int] | None = None,
    prediction_type: str | None = None,
    description: str | None = None,
    author: str | None = None,
    date: datetime | None = None,
) -> dict[str, str]:
    """The metadata of a LoRA file, without hashes (see :func:`finalize_lora_file`).

    * kohya minimum: ``ss_network_module=networks.lora``, ``ss_network_dim`` (``rank``),
      ``ss_network_alpha`` (``alpha`` as a float string, e.g. ``"8.0"``), ``ss_network_args`` (JSON of the
      ``network_args`` values as strings, kohya-style, e.g. ``{"conv_dim": "4"}``), ``ss_v2``,
      ``ss_base_model_version``, ``ss_output_name``;
    * ``training``: further ``ss_*`` keys from the trainer (``ss_steps``, ``ss_learning_rate``,
      ``ss_tag_frequency`` as JSON text, ...); values must already be strings and may not redefine the
      minimum keys;
    * ``modelspec.*``: spec version, ``architecture`` (``<family>/lora``), ``implementation``, ``title``
      (default ``output_name``), ``resolution`` (``WxH``, default the family's), ``date`` (ISO-8601,
      default now, local time with offset), and when given ``prediction_type``, ``trigger_phrase``
      (trigger words joined by ``", "``), ``description``, ``author``;
    * ``tuner``: JSON of ``{"version": 1, "family": family.name, **tuner_block}``.

    Raises ``ValueError`` for a bad rank/alpha, a non-``ss_`` or conflicting training key, a tuner block
    naming another family or not JSON-serialisable; ``TypeError`` for non-string training values.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    meta: dict[str, str] = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({str(k): str(v) for k, v in (network_args or {}).items()}),
        "ss_v2": str(bool(family.ss_v2)),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_output_name": output_name,
    }
    for key, value in (training or {}).items():
        if not key.startswith("ss_"):
            raise ValueError(f"training metadata keys must start with 'ss_', got {key!r}")
        if key in meta:
            raise ValueError(f"training metadata may not redefine {key!r} (it is derived from the arguments)")
        if not isinstance(value, str):
            raise TypeError(f"training metadata {key!r} must be a str, got {type(value).__name__} {value!r}")
        meta[key] = value

    width, height = _resolution(resolution if resolution is not None else family.resolution)
    when = date or datetime.now().astimezone()  # local time with its UTC offset, like kohya
    meta.update(
        {
            "modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": f"{family.modelspec_architecture}/lora",
            "modelspec.implementation": family.modelspec_implementation,
            "modelspec.title": title or output_name,
            "modelspec.resolution": f"{width}x{height}",
            "modelspec.date": when.isoformat(timespec="seconds"),
        }
    )
    optional = {
        # ModelSpec spells the two kinds `epsilon` and `v` (diffusers' scheduler says `v_prediction`).
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction_type, prediction_type)
        if prediction_type else None,
        "modelspec.trigger_phrase": ", ".join(trigger_words) or None,
        "modelspec.description": description,
        "modelspec.author": author,
    }
    meta.update({k: v for k, v in optional.items() if v})

    block: dict[str, Any] = {"version": TUNER_BLOCK_VERSION, "family": family.name}
    for key, value in (tuner_block or {}).items():
        if key == "family" and value != family.name:
            raise ValueError(f"tuner_block says family {value!r} but the file is for {family.name!r}")
        block[key] = value
    try:
        meta[TUNER_KEY] = json.dumps(block, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tuner_block must be JSON-serialisable: {exc}") from None
    return meta


def read_tuner_block(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The decoded ``tuner`` block of a file's metadata, or None if absent or not a JSON object."""
    raw = metadata.get(TUNER_KEY)
    if raw is None:
        return None
    try:
        block = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return block if isinstance(block, dict) else None


def ss_only(metadata: Mapping[str, str]) -> dict[str, str]:
    """The ``ss_*`` entries (what kohya hashes with; ``sshs_*`` are not among them)."""
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


def _ss_serialisation(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    return save(prepare_tensors(tensors), metadata=ss_only(check_metadata(metadata)) or None)


def _data_hash(serialised: bytes) -> str:
    header_len = int.from_bytes(serialised[:8], "little")
    return hashlib.sha256(memoryview(serialised)[8 + header_len :]).hexdigest()


def _legacy_hash(serialised: bytes) -> str:
    start, end = _LEGACY_RANGE
    return hashlib.sha256(serialised[start:end]).hexdigest()[:8]


def tensor_data_hash(tensors: Mapping[str, torch.Tensor], ss_metadata: Mapping[str, str]) -> str:
    """``sshs_model_hash``: SHA-256 (hex) of the tensor data of ``safetensors.torch.save(tensors, ss_only)``.

    The data block does not depend on metadata, so this also equals the SHA-256 of the final file's bytes
    after its header (FORMATS.md §2.3). Pass the tensors exactly as written (final dtype).
    """
    return _data_hash(_ss_serialisation(tensors, ss_metadata))


def legacy_hash(tensors: Mapping[str, torch.Tensor], ss_metadata: Mapping[str, str]) -> str:
    """``sshs_legacy_hash``: first 8 hex chars of SHA-256 of bytes ``[0x100000, 0x110000)`` of the ss-only file.

    Depends on header bytes, so it does not match the final file (informational, as in kohya).
    """
    return _legacy_hash(_ss_serialisation(tensors, ss_metadata))


def finalize_lora_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``metadata`` with ``sshs_model_hash``, ``sshs_legacy_hash`` and ``modelspec.hash_sha256``.

    Any stale values of those keys are replaced. ``tensors`` must be exactly what will be written.
    """
    serialised = _ss_serialisation(tensors, metadata)
    model_hash = _data_hash(serialised)
    out = {k: v for k, v in check_metadata(metadata).items() if k not in HASH_KEYS}
    out["sshs_model_hash"] = model_hash
    out["sshs_legacy_hash"] = _legacy_hash(serialised)
    out["modelspec.hash_sha256"] = "0x" + model_hash
    return out


def _resolution(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    width, height = value
    return int(width), int(height)
