"""Describe an adapter file: format, family, targets, rank/alpha, metadata and whether its hash is right.

Works from the header; it reads only the alpha scalars and streams the tensor bytes once to recompute
``sshs_model_hash`` (the SHA-256 of everything after the header, FORMATS.md §2.3).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tuner.errors import FormatError
from tuner.formats.common import decode_metadata
from tuner.formats.compat import expected_loaders, format_loaders
from tuner.formats.detect import (
    EMBEDDING_FORMATS,
    KOHYA_FORMATS,
    LYCORIS_FORMATS,
    PEFT_FORMATS,
    detect_family,
    detect_format,
    family_from_shapes,
)
from tuner.formats.embeddings import PICKLE_SUFFIXES, EmbeddingData, describe_width, read_embedding
from tuner.formats.io import TensorInfo, data_offset, read_header, read_tensors
from tuner.formats.kohya import KOHYA_PREFIXES
from tuner.formats.metadata import TUNER_KEY
from tuner.formats.peft import parse_key

METHODS = {
    "kohya": "lora",
    "kohya-locon": "locon",
    "kohya-bundle": "lora+embedding",
    "peft": "lora",
    "diffusers-old": "lora",
    "diffusers-attn-processor": "lora",
    "embedding-kohya": "embedding",
    "embedding-sdxl": "embedding",
    "embedding-diffusers": "embedding",
    "lycoris-loha": "loha",
    "lycoris-lokr": "lokr",
    "dora": "dora",
}

TOP_TAGS = 10
# The tensor whose first dimension is a LyCORIS module's rank, by priority (LoKr: w2's factor wins).
_RANK_PARTS = {"lora_down.weight": 3, "hada_w1_b": 3, "lokr_w2_b": 2, "lokr_w1_b": 1}
_KOHYA_TE = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks|input_blocks|output_blocks)[._](\d+)|^(mid_block|middle_block)")
# Leaf layer names, longest first so that ``ff_net_0_proj`` wins over ``proj``.
_LAYERS = (
    "ff_net_0_proj", "ff_net_2", "to_out_0", "to_q", "to_k", "to_v", "proj_in", "proj_out",
    "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "time_emb_proj", "conv_shortcut", "conv1", "conv2",
    "in_layers_2", "out_layers_3", "emb_layers_1", "skip_connection", "op", "conv",
)  # fmt: skip


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A description of the adapter file at ``path`` (a :class:`FormatError` if it is no valid safetensors).

    Keys: ``path``, ``size_bytes``, ``format`` (``"unknown"`` plus ``problem`` when no format matches),
    ``family`` (or None), ``method`` (lora, locon, embedding, loha, lokr, dora, ...), ``tensors``,
    ``modules``, ``targets`` ({block: modules}, e.g. ``unet.down_blocks.0``, ``text_encoder``), ``layers``
    ({leaf layer name: modules}), ``rank`` / ``alpha`` (single values, None when they vary or are unknown),
    ``rank_alpha`` ({module: {"rank", "alpha"}} only when they vary), ``dtype`` (a name, or {name: count}),
    ``embeddings`` ({key: shape} for embedding files), ``embedding`` (for embedding files and bundles: the
    layout, token, ``vectors`` {key: "n x D"} and the family the width implies, or ``problem``),
    ``metadata`` (every entry, JSON values decoded), ``hashes`` (stored vs recomputed
    ``sshs_model_hash``, ``matches``: bool, or None when none is stored), ``kinds`` ({lora/loha/lokr/
    dora+...: modules}, only when not all plain LoRA), ``trigger_words``, ``tags`` (the most frequent
    ``ss_tag_frequency`` tags, ``[tag, count]``) and ``loaders`` ({tool: {"loads", "why"}}, see
    :func:`~tuner.formats.compat.expected_loaders`). ``.pt``/``.bin`` files are read
    as embeddings only (``weights_only``; anything else is refused).
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return _inspect_pickled_embedding(p)
    metadata, header = read_header(p)
    shapes = {k: shape for k, (_, shape) in header.items()}
    info: dict[str, Any] = {"path": str(p), "size_bytes": p.stat().st_size, "tensors": len(header)}
    try:
        fmt = detect_format(header, shapes)
    except FormatError as exc:
        fmt = "unknown"
        info["problem"] = str(exc)
    info["format"] = fmt
    info["family"] = detect_family(metadata, shapes)
    info["method"] = METHODS.get(fmt, "unknown")

    modules = _modules(fmt, header)
    info["modules"] = len(modules)
    info["targets"] = dict(sorted(Counter(m["group"] for m in modules.values()).items()))
    info["layers"] = dict(sorted(Counter(m["layer"] for m in modules.values()).items()))
    _rank_alpha(p, header, modules, info)
    dtypes = Counter(dtype for dtype, _ in header.values())
    info["dtype"] = next(iter(dtypes)) if len(dtypes) == 1 else dict(dtypes)
    if fmt in EMBEDDING_FORMATS or fmt == "kohya-bundle":
        info["embeddings"] = {
            k: list(shape)
            for k, shape in shapes.items()
            if fmt != "kohya-bundle" or k.startswith("bundle_emb.")
        }
        info["embedding"] = _embedding_summary(p)
    kinds = Counter(m.get("kind", "lora") for m in modules.values())
    if len(kinds) > 1 or (kinds and next(iter(kinds)) != "lora"):
        info["kinds"] = dict(sorted(kinds.items()))
        if fmt in LYCORIS_FORMATS:
            info["method"] = "+".join(sorted({k.removeprefix("dora+") for k in kinds})) + (
                "+dora" if any(k.startswith("dora+") for k in kinds) else ""
            )
    table = info.pop("_rank_alpha_all")
    info["metadata"] = decode_metadata(metadata)
    info["trigger_words"] = _trigger_words(info["metadata"])
    info["tags"] = _top_tags(info["metadata"])
    info["hashes"] = _hashes(p, metadata)
    layout = (info.get("embedding") or {}).get("format")
    info["loaders"] = expected_loaders(fmt, info["family"], list(header), table, layout) if fmt != "unknown" else {}
    return info


def _trigger_words(metadata: dict[str, Any]) -> list[str]:
    """From ``modelspec.trigger_phrase`` (comma-separated) and the tuner block's ``token``/``tokens``."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase")
    if isinstance(phrase, str):
        words += [w.strip() for w in phrase.split(",") if w.strip()]
    block = metadata.get(TUNER_KEY)
    if isinstance(block, dict):
        for key in ("token", "tokens", "trigger_words"):
            value = block.get(key)
            words += [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, str)]
    return list(dict.fromkeys(words))


def _top_tags(metadata: dict[str, Any], n: int = TOP_TAGS) -> list[list[Any]]:
    """The ``n`` most frequent caption tags of ``ss_tag_frequency`` (summed over its folders)."""
    freq = metadata.get("ss_tag_frequency")
    counts: Counter[str] = Counter()
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                counts.update({str(t): int(c) for t, c in tags.items() if isinstance(c, (int, float))})
    return [[tag, count] for tag, count in counts.most_common(n)]


def _embedding_summary(p: Path) -> dict[str, Any]:
    """Layout, token, vector shapes and the family their width implies (or the reading problem)."""
    try:
        return _summarise(read_embedding(p))
    except FormatError as exc:
        return {"problem": str(exc)}


def _summarise(data: EmbeddingData) -> dict[str, Any]:
    widths = {key: int(v.shape[1]) for key, v in data.vectors.items()}
    implied = "SDXL" if data.is_sdxl else describe_width(next(iter(widths.values())))
    return {
        "format": data.format,
        "token": data.token,
        "vectors": {key: f"{data.n_vectors} x {w}" for key, w in widths.items()},
        "implies": implied,
    }


def _inspect_pickled_embedding(p: Path) -> dict[str, Any]:
    """:func:`inspect_file` for a ``.pt``/``.bin`` embedding (read with ``weights_only=True``)."""
    data = read_embedding(p)
    shapes = {("clip_g" if k == "clip_g" else "emb_params"): tuple(v.shape) for k, v in data.vectors.items()}
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return {
        "path": str(p), "size_bytes": p.stat().st_size, "tensors": len(data.vectors),
        "format": f"embedding-{data.format}", "family": family_from_shapes(shapes), "method": "embedding",
        "modules": 0, "targets": {}, "layers": {}, "rank": None, "alpha": None, "dtype": "pickle",
        "embeddings": {k: list(v.shape) for k, v in data.vectors.items()},
        "embedding": _summarise(data), "metadata": dict(data.metadata), "trigger_words": [], "tags": [],
        "loaders": expected_loaders(f"embedding-{data.format}", None, [], None, data.format),
        "hashes": {"sshs_model_hash": None, "recomputed": digest, "matches": None,
                   "modelspec_hash_matches": None, "sshs_legacy_hash": None},
    }  # fmt: skip


def _modules(fmt: str, header: dict[str, TensorInfo]) -> dict[str, dict[str, Any]]:
    """module name -> {"group", "layer", "down" (key of the tensor whose first dim is the rank), "alpha"
    (key or None), "kind" (lora, loha, lokr, with ``dora+`` when it has a magnitude)}."""
    modules: dict[str, dict[str, Any]] = {}
    kohya_named = all(k.startswith(KOHYA_PREFIXES) for k in header)
    if fmt in LYCORIS_FORMATS and kohya_named:
        for key in header:
            name, _, part = key.partition(".")
            entry = modules.setdefault(name, {"group": _kohya_group(name), "layer": _layer(name), "kind": "lora"})
            if part in _RANK_PARTS and _RANK_PARTS[part] >= entry.get("rank_priority", -1):
                entry["down"], entry["rank_priority"] = key, _RANK_PARTS[part]
            if part.startswith("hada_"):
                entry["kind"] = "loha"
            elif part.startswith("lokr_"):
                entry["kind"] = "lokr"
            elif part == "alpha":
                entry["alpha"] = key
            elif part == "dora_scale":
                entry["dora"] = True
        for entry in modules.values():
            if entry.pop("dora", False):
                entry["kind"] = "dora+" + entry["kind"]
    elif fmt in KOHYA_FORMATS or fmt == "kohya-bundle":
        for key in header:
            if key.startswith("bundle_emb."):
                continue
            name, _, part = key.partition(".")
            entry = modules.setdefault(name, {"group": _kohya_group(name), "layer": _layer(name)})
            if part == "lora_down.weight":
                entry["down"] = key
            elif part == "alpha":
                entry["alpha"] = key
    elif fmt in PEFT_FORMATS or fmt == "dora":
        magnitudes = {k.rsplit(".lora_magnitude_vector", 1)[0] for k in header if ".lora_magnitude_vector" in k}
        for key in header:
            parsed = parse_key(key)
            if parsed is None:
                continue
            if any(key.startswith(prefix + ".") for prefix in magnitudes):
                modules.setdefault(parsed[0], {}).setdefault("kind", "dora+lora")
            canonical, part = parsed
            component, path = canonical.split(":", 1)
            group = component if component != "unet" else _unet_group(path)
            entry = modules.setdefault(canonical, {})
            entry.update(group=group, layer=_layer(path.replace(".", "_")))
            if part in ("down", "alpha"):
                entry[part] = key
    return modules


def _kohya_group(name: str) -> str:
    if name.startswith("lora_unet_"):
        return _unet_group(name[len("lora_unet_") :])
    for prefix, component in _KOHYA_TE.items():
        if name.startswith(prefix):
            return component
    return "other"


def _unet_group(path: str) -> str:
    match = _BLOCK.match(path)
    if match is None:
        return "unet.other"
    if match.group(3):
        return f"unet.{match.group(3)}"
    return f"unet.{match.group(1)}.{match.group(2)}"


def _layer(flat_name: str) -> str:
    for layer in _LAYERS:
        if flat_name == layer or flat_name.endswith("_" + layer):
            return layer
    return flat_name.rsplit("_", 1)[-1]


def _rank_alpha(
    p: Path, header: dict[str, TensorInfo], modules: dict[str, dict[str, Any]], info: dict[str, Any]
) -> None:
    """Fill ``rank``/``alpha`` (and ``rank_alpha`` when they vary); a module without alpha has alpha = rank."""
    alpha_keys = [m["alpha"] for m in modules.values() if m.get("alpha")]
    alphas = (
        {k: float(t.float().reshape(-1)[0]) for k, t in read_tensors(p, alpha_keys).items()}
        if alpha_keys
        else {}
    )
    table: dict[str, dict[str, Any]] = {}
    for name, m in modules.items():
        shape = header[m["down"]][1] if m.get("down") else ()
        rank = shape[0] if shape else None
        alpha = alphas.get(m.get("alpha") or "")
        conv3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        table[name] = {"rank": rank, "alpha": alpha if alpha is not None else rank, "conv3": conv3}
    ranks = {row["rank"] for row in table.values()}
    alpha_values = {row["alpha"] for row in table.values()}
    info["rank"] = next(iter(ranks)) if len(ranks) == 1 else None
    info["alpha"] = next(iter(alpha_values)) if len(alpha_values) == 1 else None
    info["_rank_alpha_all"] = table
    if len(ranks) > 1 or len(alpha_values) > 1:
        info["rank_alpha"] = {k: {"rank": v["rank"], "alpha": v["alpha"]} for k, v in table.items()}


def _hashes(p: Path, metadata: dict[str, str]) -> dict[str, Any]:
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        fh.seek(data_offset(p))
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    recomputed = digest.hexdigest()
    stored = metadata.get("sshs_model_hash")
    spec = metadata.get("modelspec.hash_sha256")
    return {
        "sshs_model_hash": stored,
        "recomputed": recomputed,
        "matches": None if stored is None else stored.lower() == recomputed,
        "modelspec_hash_matches": None if spec is None else spec.lower() == "0x" + recomputed,
        "sshs_legacy_hash": metadata.get("sshs_legacy_hash"),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """A human-readable report of :func:`inspect_file`'s result."""
    lines = [f"{info['path']} ({info['size_bytes']:,} bytes)"]
    lines.append(
        f"  format:  {info['format']}   method: {info['method']}   family: {info.get('family') or 'unknown'}"
    )
    if info.get("problem"):
        lines.append("  problem: " + info["problem"].replace("\n", "\n           "))
    dtype = (
        info["dtype"]
        if isinstance(info["dtype"], str)
        else ", ".join(f"{k} x{v}" for k, v in info["dtype"].items())
    )
    lines.append(f"  tensors: {info['tensors']}   modules: {info['modules']}   dtype: {dtype}")
    if info["modules"]:
        if info.get("rank_alpha"):
            combos = Counter((row["rank"], row["alpha"]) for row in info["rank_alpha"].values())
            text = ", ".join(f"rank {r} alpha {a} x{n}" for (r, a), n in sorted(combos.items(), key=str))
            lines.append(f"  rank/alpha vary: {text}")
        else:
            lines.append(f"  rank: {info['rank']}   alpha: {info['alpha']}")
        lines.append("  targets: " + ", ".join(f"{group} ({n})" for group, n in info["targets"].items()))
        lines.append("  layers:  " + ", ".join(f"{layer} ({n})" for layer, n in info["layers"].items()))
    for key, shape in info.get("embeddings", {}).items():
        lines.append(f"  embedding {key}: {shape}")
    summary = info.get("embedding") or {}
    if summary.get("problem"):
        lines.append("  embedding problem: " + summary["problem"])
    elif summary:
        vectors = ", ".join(f"{k} {v}" for k, v in summary["vectors"].items())
        lines.append(f"  embedding: token '{summary['token']}' ({summary['format']} layout), vectors {vectors}, "
                     f"width implies {summary['implies']}")
    if info.get("kinds"):
        lines.append("  module kinds: " + ", ".join(f"{k} ({n})" for k, n in info["kinds"].items()))
    if info.get("trigger_words"):
        lines.append("  trigger words: " + ", ".join(info["trigger_words"]))
    if info.get("tags"):
        lines.append("  top tags: " + ", ".join(f"{t} ({n})" for t, n in info["tags"]))
    if info.get("loaders"):
        lines.append("  expected to load fully (FORMATS.md rules, key layout only):")
        lines.extend(format_loaders(info["loaders"]))
    hashes = info["hashes"]
    verdict = {True: "matches", False: "DOES NOT MATCH", None: "not stored"}[hashes["matches"]]
    lines.append(
        f"  sshs_model_hash: {hashes['sshs_model_hash'] or '-'} ({verdict}; tensor data {hashes['recomputed']})"
    )
    if info["metadata"]:
        lines.append("  metadata:")
        for key, value in sorted(info["metadata"].items()):
            text = str(value)
            lines.append(f"    {key}: {text if len(text) <= 100 else text[:97] + '...'}")
    return "\n".join(lines)
