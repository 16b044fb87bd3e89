"""diffusers / PEFT LoRA state dicts (FORMATS.md §3): ``unet.<path>.lora_A.weight`` and relatives.

These files are for diffusers only (ComfyUI drops their attention parts, A1111 reads none of it). They have
no per-module alpha: diffusers builds a ``LoraConfig`` with ``lora_alpha = r`` unless the file carries
``lora_adapter_metadata``. So :func:`to_peft_state_dict` bakes ``alpha / r`` into ``lora_B``, and the delta
diffusers computes equals ours exactly.

Key namings read by :func:`from_peft_state_dict` (all with ``unet.`` / ``text_encoder.`` /
``text_encoder_2.`` prefixes; bare UNet paths, as ``save_attn_procs`` wrote them, count as ``unet``):

* PEFT: ``<path>.lora_A.weight`` (down) / ``<path>.lora_B.weight`` (up);
* diffusers-saved: ``<path>.lora.down.weight`` / ``.lora.up.weight``, text encoder
  ``<path>.lora_linear_layer.down.weight`` / ``.up.weight``;
* old attention processors: ``<attn>.processor.to_q_lora.down.weight`` -> module ``<attn>.to_q``
  (``to_out_lora`` -> ``to_out.0``; in a text encoder ``to_q_lora`` -> ``q_proj``, ``to_out_lora`` ->
  ``out_proj``);
* an optional ``<path>.alpha`` scalar per module (otherwise alpha comes from the adapter metadata, else rank).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch

from tuner.adapters.types import COMPONENTS, LoraModule, LoraWeights, split_key
from tuner.errors import FormatError
from tuner.formats.common import listing

PEFT_METADATA = {"format": "pt"}

# Key suffix -> factor, for the non-processor namings.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)

# Old attention-processor naming: ``<attn>[.processor].to_q_lora.down.weight`` (or ``.alpha``).
_PROCESSOR = re.compile(
    r"^(?P<base>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down\.weight|up\.weight|alpha)$"
)
_PROCESSOR_PART = {"down.weight": "down", "up.weight": "up", "alpha": "alpha"}
_PROCESSOR_MODULE = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}

# First path segments of the diffusers UNet, for files without a component prefix.
UNET_ROOTS = (
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
)

ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def to_peft_state_dict(
    weights: LoraWeights, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-named tensors and ``{"format": "pt"}`` metadata, with the scale baked into ``lora_B``.

    ``lora_B = up * alpha / r`` (computed in fp32, then cast to ``dtype``, default: the factors' dtype), so a
    loader that assumes ``lora_alpha = r`` reproduces ``alpha / r * up @ down``. Text-encoder paths keep the
    ``text_model.`` level.
    """
    state: dict[str, torch.Tensor] = {}
    for key, module in weights.modules.items():
        component, path = split_key(key)
        out_dtype = dtype or module.up.dtype
        state[f"{component}.{path}.lora_A.weight"] = (
            module.down.detach().to(dtype or module.down.dtype).contiguous()
        )
        state[f"{component}.{path}.lora_B.weight"] = (module.up.detach().float() * module.scale).to(out_dtype)
    return state, dict(PEFT_METADATA)


def from_peft_state_dict(
    sd: Mapping[str, torch.Tensor], *, adapter_metadata: Mapping[str, object] | None = None
) -> LoraWeights:
    """Read any of the diffusers/PEFT namings (module docstring) into :class:`LoraWeights`.

    A module's alpha is its ``.alpha`` tensor if present, else ``<component>.lora_alpha`` from diffusers'
    ``adapter_metadata`` (the decoded ``lora_adapter_metadata`` JSON) if given, else its rank (what
    diffusers assumes). Unrecognised keys, incomplete modules and modules named twice are reported together
    in one :class:`FormatError`.
    """
    default_alpha = _alphas_from_adapter_metadata(adapter_metadata or {})
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    problems: list[str] = []
    for key in sorted(sd):
        parsed = parse_key(key)
        if parsed is None:
            problems.append(f"{key} (not a LoRA factor or alpha of a diffusers/PEFT file)")
            continue
        canonical, part = parsed
        slot = groups.setdefault(canonical, {})
        if part in slot:
            problems.append(f"{key} (module {canonical} already has a {part} tensor: {slot[part][0]})")
            continue
        slot[part] = (key, sd[key])

    modules: dict[str, LoraModule] = {}
    for canonical, parts in groups.items():
        missing = [p for p in ("down", "up") if p not in parts]
        if missing:
            problems.append(
                f"{canonical}: no {' or '.join(missing)} factor (have {[k for k, _ in parts.values()]})"
            )
            continue
        down, up = parts["down"][1], parts["up"][1]
        if down.shape[0] != up.shape[1]:
            problems.append(
                f"{canonical}: down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank"
            )
            continue
        rank = int(down.shape[0])
        component = canonical.split(":", 1)[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"][1].reshape(()).item())
        else:
            alpha = float(default_alpha.get(component, rank))
        if not math.isfinite(alpha) or alpha == 0:
            problems.append(f"{canonical}: alpha is {alpha}")
            continue
        modules[canonical] = LoraModule(down=down, up=up, alpha=alpha)
    if problems:
        raise FormatError(listing(f"{len(problems)} problem(s) reading a diffusers/PEFT LoRA", problems))
    return LoraWeights(modules=modules)


def parse_key(key: str) -> tuple[str, str] | None:
    """``(canonical module key, "down" | "up" | "alpha")`` for a diffusers/PEFT key, or None if it is not one."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        if key.split(".", 1)[0] not in UNET_ROOTS:
            return None
        component, rest = "unet", key
    match = _PROCESSOR.match(rest)
    if match:
        table = _PROCESSOR_MODULE["unet" if component == "unet" else "text_encoder"]
        path, part = f"{match['base']}.{table[match['proj']]}", _PROCESSOR_PART[match["part"]]
    else:
        found = _split_suffix(rest)
        if found is None:
            return None
        path, part = found
    if component != "unet" and not path.startswith("text_model."):
        path = "text_model." + path  # transformers >= 5 reports CLIPTextModel paths without it
    canonical = f"{component}:{path}"
    split_key(canonical)
    return canonical, part


def _split_suffix(rest: str) -> tuple[str, str] | None:
    for suffix, part in SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], part
    return None


def _alphas_from_adapter_metadata(meta: Mapping[str, object]) -> dict[str, float]:
    """component -> lora_alpha from diffusers' packed LoraConfig fields (``unet.lora_alpha``, ...)."""
    alphas: dict[str, float] = {}
    for component in COMPONENTS:
        pattern = meta.get(f"{component}.alpha_pattern")
        if pattern:
            raise FormatError(
                f"{ADAPTER_METADATA_KEY}: per-module alpha ({component}.alpha_pattern) is not supported: "
                f"{json.dumps(pattern)[:200]}"
            )
        value = meta.get(f"{component}.lora_alpha")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            alphas[component] = float(value)
    return alphas
