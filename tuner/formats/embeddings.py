"""Textual-inversion embedding files: read every common layout, write kohya, diffusers and A1111 ones.

FORMATS.md §4-5. In memory an embedding is an :class:`EmbeddingData`: fp32 vectors ``[n, D]`` per text
encoder (key :data:`SINGLE_KEY` for one-encoder families, ``clip_l`` and ``clip_g`` for SDXL), the
suggested trigger token, the layout it came from and string metadata.

Layouts read (the first rule that matches wins; keys of ``.pt`` dicts are flattened with ``.``):

=============  ====================================================  ================================
format         tensors                                               token
=============  ====================================================  ================================
bundle         ``bundle_emb.<name>.<key>`` inside a LoRA file        ``<name>`` (chosen by ``token``)
a1111          ``string_to_param.*`` (+ ``name``, ``step``, ...)     file stem (as A1111 does)
kohya          ``clip_l`` + ``clip_g`` (SDXL), or ``emb_params``     file stem
onetrainer     ``emp_params`` (``emp_params_out`` is ignored)        file stem
diffusers      one tensor under any key (or a bare ``.pt`` tensor)   the key (the stem for a bare one)
=============  ====================================================  ================================

``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)`` only: a file that needs more than
plain tensors, dicts, strings and numbers is refused unread, never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from tuner.errors import FormatError
from tuner.formats.io import read_header, read_tensors, save_safetensors, write_bytes_atomic
from tuner.formats.metadata import MODELSPEC_VERSION, TUNER_BLOCK_VERSION, TUNER_KEY
from tuner.models.families import Family

SINGLE_KEY = "text_encoder"
"""Key of :attr:`EmbeddingData.vectors` for families with one text encoder (SD1.x, SD2.x, tiny)."""
SDXL_KEYS = ("clip_l", "clip_g")
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")
LAYOUTS = (
    "bundle_emb.<name>.<key> (LoRA bundle)",
    "string_to_param (A1111)",
    "clip_l + clip_g (SDXL)",
    "emb_params (kohya)",
    "emp_params (OneTrainer)",
    "a single tensor (diffusers)",
)
# Text-encoder widths of the families an embedding file can be for (FORMATS.md §4).
WIDTHS = {
    768: "SD1.x (CLIP-L; also SDXL's clip_l)",
    1024: "SD2.x (OpenCLIP-H)",
    1280: "SDXL's clip_g (OpenCLIP-bigG)",
    128: "tuner's tiny base",
}
TI_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # what kohya writes for TI files
_BUNDLE = "bundle_emb."
_INNER_KEYS = ("string_to_param.*", "clip_l", "clip_g", "emb_params", "emp_params", "emp_params_out")


@dataclass
class EmbeddingData:
    """A textual-inversion embedding as read from a file.

    ``vectors``: fp32 ``[n, D]`` CPU tensors, ``{SINGLE_KEY: t}`` for one-encoder families or
    ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for SDXL. ``token``: the trigger to register (the file's
    suggestion, or the caller's override). ``format``: ``kohya``, ``diffusers``, ``a1111``, ``onetrainer``
    or ``bundle``. ``metadata``: the file's string metadata (safetensors header, or A1111's ``name``,
    ``step``, ``sd_checkpoint`` fields as strings).
    """

    vectors: dict[str, torch.Tensor]
    token: str
    format: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return set(self.vectors) == set(SDXL_KEYS)

    @property
    def n_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def describe_width(width: int) -> str:
    """Which family an embedding width belongs to, e.g. ``"SD2.x (OpenCLIP-H)"`` for 1024."""
    return WIDTHS.get(width, "no family tuner knows")


# ---------------------------------------------------------------- reading


def read_embedding(path: str | os.PathLike[str], token: str | None = None) -> EmbeddingData:
    """Read a textual-inversion embedding (safetensors, or ``.pt``/``.bin``/``.ckpt`` read with
    ``weights_only=True``) in any layout of the module docstring.

    ``token`` overrides the file's suggested token; in a LoRA bundle holding several embeddings it also
    selects which one (by name; a single bundled embedding is renamed to ``token`` instead). 1-D vectors
    become ``[1, D]``; the result is always fp32. Every problem is a :class:`FormatError` naming the
    file: unreadable or unsafe pickles (with the fix: convert to .safetensors), an unknown layout (listing
    the keys found and the layouts tried), several bundled embeddings and no choice, non-float or
    wrongly shaped tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"embedding file '{p}' does not exist" if not p.exists() else f"'{p}' is not a file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        tensors, extras = _load_pickle(p)
        metadata: dict[str, str] = {}
    else:
        metadata, header = read_header(p)
        tensors = dict.fromkeys(header)  # names only; the chosen ones are read below
        extras = {}
    fmt, chosen, suggested = _layout(p, list(tensors), token)
    if any(tensors[name] is None for name in chosen.values()):
        loaded = read_tensors(p, list(chosen.values()))
        tensors.update(loaded)
    vectors = {key: _as_vectors(p, name, tensors[name]) for key, name in chosen.items()}
    if len({v.shape[0] for v in vectors.values()}) > 1:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in vectors.items())
        raise FormatError(f"{p}: the SDXL vectors disagree on the number of vectors ({shapes})")
    for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        if extras.get(key) is not None:
            metadata[key] = str(extras[key])
    return EmbeddingData(vectors=vectors, token=token or suggested, format=fmt, metadata=metadata)


def _load_pickle(p: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(flat tensors, other top-level values)`` of a torch pickle, loaded with ``weights_only=True``."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only ran no code: any failure at all means "refuse"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"{p}: refused: this pickle cannot be read safely (torch.load with weights_only=True failed: "
            f"{first}). tuner never unpickles arbitrary objects, since that can run code. If you trust "
            "the file, convert it to .safetensors in a separate step (load it, then "
            "safetensors.torch.save_file the tensors) and pass that instead."
        ) from None
    if isinstance(obj, torch.Tensor):
        return {"": obj}, {}
    if not isinstance(obj, dict):
        raise FormatError(f"{p}: holds a {type(obj).__name__}, not a dict of tensors; expected one of: "
                          + "; ".join(LAYOUTS))
    tensors: dict[str, Any] = {}
    _flatten(obj, "", tensors)
    if not tensors:
        shown = ", ".join(repr(k) for k in list(obj)[:12]) or "none"
        raise FormatError(f"{p}: not a textual-inversion embedding: no tensors (top-level keys: {shown}); "
                          "looked for: " + "; ".join(LAYOUTS))
    extras = {k: v for k, v in obj.items() if isinstance(k, str) and not isinstance(v, dict | torch.Tensor)}
    return tensors, extras


def _flatten(obj: Mapping[Any, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", out)


def _layout(p: Path, keys: list[str], token: str | None) -> tuple[str, dict[str, str], str]:
    """``(format, {vectors key: tensor name}, suggested token)`` for a file's tensor names."""
    bundled = [k for k in keys if k.startswith(_BUNDLE)]
    if bundled:
        groups: dict[str, list[str]] = {}
        for key in bundled:
            name, inner = _split_bundle_key(key)
            groups.setdefault(name, []).append(inner)
        if token is not None and token in groups:
            name = token
        elif len(groups) == 1:
            name = next(iter(groups))
        else:
            names = ", ".join(sorted(groups))
            hint = f"none is named '{token}'" if token else "say which"
            raise FormatError(
                f"{p}: this LoRA file bundles {len(groups)} embeddings ({names}); {hint}: pass FILE:NAME"
            )
        layout = _inner_layout(p, groups[name])
        if layout is None:
            raise FormatError(
                f"{p}: bundled embedding '{name}' has keys {groups[name]}; expected one of: " + "; ".join(LAYOUTS)
            )
        return "bundle", {k: f"{_BUNDLE}{name}.{v}" for k, v in layout[1].items()}, name
    found = _inner_layout(p, keys)
    if found is None:
        shown = ", ".join(repr(k) for k in sorted(keys)[:12]) + (" ..." if len(keys) > 12 else "")
        raise FormatError(
            f"{p}: not a textual-inversion embedding: found {len(keys)} tensor(s) ({shown or 'none'}); "
            "looked for: " + "; ".join(LAYOUTS)
        )
    fmt, chosen = found
    suggested = chosen[SINGLE_KEY] if fmt == "diffusers" and chosen[SINGLE_KEY] else p.stem
    return fmt, chosen, suggested


def _split_bundle_key(key: str) -> tuple[str, str]:
    """``bundle_emb.<name>.<inner>`` -> ``(name, inner)``; names may contain dots, inner keys are known."""
    rest = key[len(_BUNDLE) :]
    for inner in _INNER_KEYS:
        if rest.endswith("." + inner):
            return rest[: -len(inner) - 1], inner
    name, _, inner = rest.rpartition(".")
    return (name, inner) if name else (rest, "")


def _inner_layout(p: Path, keys: list[str]) -> tuple[str, dict[str, str]] | None:
    """The non-bundle layouts: ``(format, {vectors key: tensor name})`` or None."""
    names = set(keys)
    params = [k for k in keys if k == "string_to_param" or k.startswith("string_to_param.")]
    if params:
        if len(params) != 1:
            raise FormatError(f"{p}: A1111 string_to_param holds {len(params)} tensors ({params}); expected one")
        return "a1111", {SINGLE_KEY: params[0]}
    if set(SDXL_KEYS) <= names:
        return "kohya", {"clip_l": "clip_l", "clip_g": "clip_g"}
    if names == {"emb_params"}:
        return "kohya", {SINGLE_KEY: "emb_params"}
    if "emp_params" in names and names <= {"emp_params", "emp_params_out"}:
        return "onetrainer", {SINGLE_KEY: "emp_params"}
    if len(keys) == 1:
        return "diffusers", {SINGLE_KEY: keys[0]}
    return None


def _as_vectors(p: Path, name: str, tensor: Any) -> torch.Tensor:
    where = f"{p}: tensor {name!r}" if name else f"{p}: the tensor"
    if not isinstance(tensor, torch.Tensor):
        raise FormatError(f"{where} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise FormatError(f"{where} has dtype {tensor.dtype}; embedding vectors must be floating point")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise FormatError(f"{where} has shape {list(tensor.shape)}; embedding vectors must be [n, D] (or [D])")
    return tensor.detach().to("cpu", torch.float32).contiguous()


def file_short_hash(path: str | os.PathLike[str]) -> str:
    """First 12 hex digits of the SHA-256 of the whole file: A1111's ``TI hashes`` infotext value."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- writing


def build_embedding_metadata(
    *,
    family: Family,
    token: str,
    n_vectors: int,
    tuner_block: Mapping[str, Any] | None = None,
    title: str | None = None,
    negative: bool = False,
    date: datetime | None = None,
) -> dict[str, str]:
    """Metadata of a kohya-layout embedding file (all strings; FORMATS.md §2.4 and §4).

    ``modelspec.*``: spec version, ``architecture`` = ``<family>/textual-inversion``, ``implementation``
    (the generative-models URL, as kohya writes for TI), ``title`` (default ``token``), ``resolution``,
    ``date``, ``trigger_phrase`` = ``token`` and, for a negative embedding, ``is_negative_embedding``.
    ``tuner``: JSON ``{"version", "family", "method": "textual_inversion", "token", "n_vectors",
    **tuner_block}``.
    """
    when = date or datetime.now().astimezone()
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{family.modelspec_architecture}/textual-inversion",
        "modelspec.implementation": TI_IMPLEMENTATION,
        "modelspec.title": title or token,
        "modelspec.resolution": f"{family.resolution}x{family.resolution}",
        "modelspec.date": when.isoformat(timespec="seconds"),
        "modelspec.trigger_phrase": token,
    }
    if negative:
        meta["modelspec.is_negative_embedding"] = "true"
    block: dict[str, Any] = {
        "version": TUNER_BLOCK_VERSION,
        "family": family.name,
        "method": "textual_inversion",
        "token": token,
        "n_vectors": int(n_vectors),
    }
    block.update(tuner_block or {})
    meta[TUNER_KEY] = json.dumps(block, sort_keys=True)
    return meta


def _check_vectors(vectors: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or not vectors.is_floating_point():
        shape = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"{what}: vectors must be a floating-point [n, D] tensor, got {shape}")
    return vectors.detach().to("cpu").contiguous()


def save_kohya_embedding(
    path: str | os.PathLike[str],
    vectors: torch.Tensor | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write kohya's layout with ``metadata`` (normally :func:`build_embedding_metadata`'s; strings only),
    atomically, dtype as given: ``{"emb_params": vectors}`` for a ``[n, D]`` tensor (SD1/SD2), or
    ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for an SDXL mapping with exactly those keys (kohya's
    ``sdxl_train_textual_inversion.py``, read by A1111 and ComfyUI). A1111, ComfyUI and kohya load it by
    file name, so name the file after the trigger word."""
    if isinstance(vectors, torch.Tensor):
        save_safetensors(path, {"emb_params": _check_vectors(vectors, str(path))}, metadata)
        return
    if set(vectors) != set(SDXL_KEYS):
        raise ValueError(f"{path}: an SDXL embedding has exactly the vectors {SDXL_KEYS}, got {sorted(vectors)}")
    tensors = {k: _check_vectors(vectors[k], f"{path} ({k})") for k in SDXL_KEYS}
    if tensors["clip_l"].shape[0] != tensors["clip_g"].shape[0]:
        raise ValueError(f"{path}: clip_l and clip_g must hold the same number of vectors, got "
                         f"{tensors['clip_l'].shape[0]} and {tensors['clip_g'].shape[0]}")
    save_safetensors(path, tensors, metadata)


def save_diffusers_embedding(path: str | os.PathLike[str], token: str, vectors: torch.Tensor) -> None:
    """Write ``{token: vectors}`` with metadata ``{"format": "pt"}``, as diffusers'
    ``textual_inversion.py`` writes ``learned_embeds.safetensors``; atomically."""
    save_safetensors(path, {token: _check_vectors(vectors, str(path))}, {"format": "pt"})


def save_a1111_pt(
    path: str | os.PathLike[str],
    token: str,
    vectors: torch.Tensor,
    step: int,
    *,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> None:
    """Write A1111's ``.pt`` dict (``string_to_token``, ``string_to_param``, ``name``, ``step``,
    ``sd_checkpoint``, ``sd_checkpoint_name``), atomically. It holds only tensors, str, int and None, so
    ``torch.load(weights_only=True)`` (ComfyUI, and tuner) reads it."""
    data = {
        "string_to_token": {"*": 265},  # A1111's constant: the CLIP id of "*"
        "string_to_param": {"*": _check_vectors(vectors, str(path)).clone()},
        "name": str(token),
        "step": int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def bundle_keys(token: str, vectors: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys that put an embedding into an A1111 LoRA bundle (FORMATS.md §5): for an SD1/SD2 ``[n, D]``
    tensor (or ``{SINGLE_KEY: tensor}``) ``bundle_emb.<token>.string_to_param.*``; for SDXL's
    ``{"clip_l", "clip_g"}`` ``bundle_emb.<token>.clip_l`` and ``.clip_g`` (A1111 reads a bundled dict as it
    reads a file). diffusers refuses files with these keys, so ship bundles as an extra export beside the
    plain LoRA."""
    if isinstance(vectors, Mapping) and set(vectors) == {SINGLE_KEY}:
        vectors = vectors[SINGLE_KEY]
    if isinstance(vectors, torch.Tensor):
        return {f"{_BUNDLE}{token}.string_to_param.*": _check_vectors(vectors, f"bundle '{token}'")}
    if set(vectors) != set(SDXL_KEYS):
        raise ValueError(f"bundle '{token}': expected a tensor or the vectors {SDXL_KEYS}, got {sorted(vectors)}")
    return {f"{_BUNDLE}{token}.{k}": _check_vectors(vectors[k], f"bundle '{token}' ({k})") for k in SDXL_KEYS}
