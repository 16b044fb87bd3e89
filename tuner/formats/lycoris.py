"""Reading LyCORIS (LoHa, LoKr) and DoRA files into :class:`~tuner.adapters.types.LoraWeights`.

Key layouts (LyCORIS's kohya-style files, as ComfyUI and A1111 read them; per module ``<NAME>``, named as
in kohya files, FORMATS.md §1.2):

========  ==========================================================================================
kind      tensors ``<NAME>.<part>``
========  ==========================================================================================
LoRA      ``lora_down.weight``, ``lora_up.weight``
LoHa      ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2``: Tucker)
LoKr      ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` + ``lokr_w2_b``
          (+ ``lokr_t2``: Tucker)
any       ``alpha`` (0-dim; absent or 0 means ``alpha = rank``), ``dora_scale`` (DoRA magnitude)
========  ==========================================================================================

PEFT-named DoRA files (diffusers) carry ``<component>.<path>.lora_magnitude_vector`` (``[out]``) beside
``lora_A``/``lora_B``. The deltas these define are in :mod:`tuner.adapters.lycoris`. Factors keep the
file's dtype (fp16, bf16, fp32); deltas are computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from tuner.adapters.lycoris import DoraModule, LohaModule, LokrModule
from tuner.adapters.types import LoraModule, LoraWeights
from tuner.errors import FormatError
from tuner.formats.common import listing

LORA_PARTS = ("lora_down.weight", "lora_up.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
COMMON_PARTS = ("alpha", "dora_scale")
KNOWN_PARTS = frozenset(LORA_PARTS + LOHA_PARTS + LOKR_PARTS + COMMON_PARTS)
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")
LENIENT_HINT = "pass --lenient (lenient=True) to skip them with a warning"


def from_lycoris_state_dict(
    sd: Mapping[str, torch.Tensor], name_table: Mapping[str, str], *, lenient: bool = False
) -> tuple[LoraWeights, list[str]]:
    """Read a kohya-named file whose modules may be LoRA, LoHa or LoKr, each optionally with DoRA.

    ``name_table`` maps kohya module names to canonical keys (as for
    :func:`~tuner.formats.kohya.from_kohya_state_dict`). Returns the weights (empty metadata) and the
    ignored keys. Keys of unknown parts or modules, and incomplete modules, are all listed in one
    :class:`FormatError` (first :data:`~tuner.formats.common.MAX_LISTED`, and the count) unless ``lenient``.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    ignored: list[str] = []
    for key in sorted(sd):
        name, _, part = key.partition(".")
        if part not in KNOWN_PARTS:
            problems.append(f"{key} (unknown tensor kind '{part}')")
            ignored.append(key)
        elif name not in name_table:
            problems.append(f"{key} (no module '{name}' in this model)")
            ignored.append(key)
        else:
            groups.setdefault(name, {})[part] = sd[key]

    modules: dict[str, object] = {}
    for name, parts in groups.items():
        try:
            module = _build(parts)
        except FormatError as exc:
            problems.append(f"{name}: {exc}")
            ignored.extend(f"{name}.{p}" for p in parts)
            continue
        modules[name_table[name]] = module
    if problems and not lenient:
        raise FormatError(
            listing(
                f"{len(problems)} problem(s) in a LyCORIS/DoRA file ({len(modules)} modules understood); "
                f"the file may be for another model family or use an adapter kind tuner does not read; "
                + LENIENT_HINT,
                problems,
            )
        )
    return LoraWeights(modules=modules), ignored  # type: ignore[arg-type]


def _build(parts: dict[str, torch.Tensor]) -> object:
    """One module from its parts; :class:`FormatError` (without the module name) when incomplete."""
    kinds = [
        kind
        for kind, names in (("lora", LORA_PARTS), ("loha", LOHA_PARTS), ("lokr", LOKR_PARTS))
        if any(p in parts for p in names)
    ]
    if len(kinds) != 1:
        what = " and ".join(kinds) if kinds else "only " + ", ".join(sorted(parts))
        raise FormatError(f"expected the tensors of one adapter kind, found {what}")
    alpha_t = parts.get("alpha")
    inner: LoraModule | LohaModule | LokrModule
    if kinds[0] == "lora":
        down, up = _need(parts, "lora_down.weight"), _need(parts, "lora_up.weight")
        if down.shape[0] != up.shape[1]:
            raise FormatError(f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} disagree on the rank")
        inner = LoraModule(down=down, up=up, alpha=_alpha(alpha_t, int(down.shape[0])))
    elif kinds[0] == "loha":
        w1a, w1b = _need(parts, "hada_w1_a"), _need(parts, "hada_w1_b")
        w2a, w2b = _need(parts, "hada_w2_a"), _need(parts, "hada_w2_b")
        t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise FormatError("has only one of hada_t1 / hada_t2 (Tucker LoHa needs both)")
        inner = LohaModule(w1a, w1b, w2a, w2b, alpha=_alpha(alpha_t, int(w1b.shape[0])), t1=t1, t2=t2)
        _check_product(inner)
    else:
        if "lokr_w1" not in parts and not {"lokr_w1_a", "lokr_w1_b"} <= parts.keys():
            raise FormatError("needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        if "lokr_w2" not in parts and not {"lokr_w2_a", "lokr_w2_b"} <= parts.keys():
            raise FormatError("needs lokr_w2, or lokr_w2_a and lokr_w2_b")
        inner = LokrModule(
            w1=parts.get("lokr_w1"), w1a=parts.get("lokr_w1_a"), w1b=parts.get("lokr_w1_b"),
            w2=parts.get("lokr_w2"), w2a=parts.get("lokr_w2_a"), w2b=parts.get("lokr_w2_b"),
            t2=parts.get("lokr_t2"),
        )
        inner.alpha = _alpha(alpha_t, inner.rank) if inner.rank is not None else None
        _check_product(inner)
    if "dora_scale" in parts:
        return DoraModule(inner, parts["dora_scale"])
    return inner


def _check_product(module: LohaModule | LokrModule) -> None:
    """Check that the factors chain (inner dimensions agree), so that a bad file fails here, with shapes."""
    shapes = {k: tuple(v.shape) for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
    pairs = (("w1a", "w1b"), ("w2a", "w2b"))
    ok = True
    for a, b in pairs:
        if a in shapes and b in shapes:
            tucker = "t1" in shapes if a == "w1a" else "t2" in shapes
            inner_a = shapes[a][0] if tucker else shapes[a][-1]
            ok &= len(shapes[a]) == 2 and len(shapes[b]) == 2 and inner_a == shapes[b][0]
    for t, a in (("t1", "w1a"), ("t2", "w2a")):
        if t in shapes:
            ok &= len(shapes[t]) == 4 and shapes[t][0] == shapes[a][0] and shapes[t][1] == shapes[a.replace("a", "b")][0]
    if isinstance(module, LohaModule):
        ok &= module.out_in() == (
            (shapes["w2a"][1], shapes["w2b"][1]) if "t2" in shapes else (shapes["w2a"][0], shapes["w2b"][1])
        )
    if not ok:
        raise FormatError(f"{module.kind} factors do not fit together: {shapes}")


def _need(parts: Mapping[str, torch.Tensor], part: str) -> torch.Tensor:
    if part not in parts:
        raise FormatError(f"missing {part} (has {', '.join(sorted(parts))})")
    return parts[part]


def _alpha(tensor: torch.Tensor | None, rank: int) -> float:
    if tensor is None:
        return float(rank)
    if tensor.numel() != 1:
        raise FormatError(f"alpha must be a scalar, got shape {tuple(tensor.shape)}")
    value = float(tensor.float().reshape(()).item())
    if not math.isfinite(value):
        raise FormatError(f"alpha is {value}")
    return float(rank) if value == 0 else value


def split_magnitudes(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A PEFT DoRA state dict split into ``(the LoRA keys, {key prefix: magnitude})``."""
    rest: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for suffix in MAGNITUDE_SUFFIXES:
            if key.endswith(suffix):
                magnitudes[key[: -len(suffix)]] = value
                break
        else:
            rest[key] = value
    return rest, magnitudes
