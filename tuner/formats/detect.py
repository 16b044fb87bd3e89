"""What kind of adapter file this is, and for which model family (STYLE.md #9).

:data:`FORMATS` is an ordered list of ``(format name, predicate)``; the first predicate that holds names
the format. Predicates see the tensor names and, when known, their shapes (``{name: shape}``). A file
mixing LyCORIS kinds is named after the first kind found in this order (DoRA, LoHa, LoKr).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from tuner.errors import FormatError
from tuner.formats.kohya import KOHYA_PREFIXES
from tuner.formats.metadata import read_tuner_block
from tuner.formats.peft import parse_key

Shapes = Mapping[str, Sequence[int]]
Predicate = Callable[[Sequence[str], Shapes], bool]

_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Module names that only LoCon targets (resnets, down/upsamplers), in diffusers and LDM spelling.
_LOCON_NAME = re.compile(
    r"_(resnets|downsamplers|upsamplers)_\d|_(in_layers_2|out_layers_3|emb_layers_1|skip_connection|op|conv)$"
)


def _is_kohya(keys: Sequence[str], shapes: Shapes) -> bool:
    return all(k.startswith(KOHYA_PREFIXES) and k.endswith(_KOHYA_SUFFIXES) for k in keys)


def _is_kohya_locon(keys: Sequence[str], shapes: Shapes) -> bool:
    """kohya keys with conv modules beyond attention: a kxk (k > 1) lora_down, or a resnet/sampler name."""
    if not _is_kohya(keys, shapes):
        return False
    for key in keys:
        if not key.endswith(".lora_down.weight"):
            continue
        shape = shapes.get(key)
        if shape is not None and len(shape) == 4 and tuple(shape[2:]) != (1, 1):
            return True
        if key.startswith("lora_unet_") and _LOCON_NAME.search(key[: -len(".lora_down.weight")]):
            return True
    return False


def _is_kohya_bundle(keys: Sequence[str], shapes: Shapes) -> bool:
    lora = [k for k in keys if not k.startswith("bundle_emb.")]
    return len(lora) < len(keys) and bool(lora) and _is_kohya(lora, shapes)


def _peft_parts(keys: Sequence[str]) -> bool:
    return all(parse_key(k) is not None for k in keys)


def _is_peft(keys: Sequence[str], shapes: Shapes) -> bool:
    return _peft_parts(keys) and any(k.endswith(".lora_A.weight") for k in keys)


def _is_diffusers_old(keys: Sequence[str], shapes: Shapes) -> bool:
    return _peft_parts(keys) and any(".lora.down.weight" in k or ".lora_linear_layer." in k for k in keys)


def _is_attn_processor(keys: Sequence[str], shapes: Shapes) -> bool:
    return _peft_parts(keys) and any(re.search(r"\.to_(q|k|v|out)_lora\.", k) for k in keys)


def _has(fragment: str) -> Predicate:
    return lambda keys, shapes: any(fragment in k for k in keys)


FORMATS: list[tuple[str, Predicate]] = [
    ("embedding-kohya", lambda keys, shapes: list(keys) == ["emb_params"]),
    ("embedding-sdxl", lambda keys, shapes: set(keys) == {"clip_l", "clip_g"}),
    ("dora", lambda keys, shapes: any(k.endswith(("dora_scale", "lora_magnitude_vector")) for k in keys)),
    ("lycoris-loha", _has(".hada_w1_a")),
    ("lycoris-lokr", _has(".lokr_w")),
    ("kohya-locon", _is_kohya_locon),
    ("kohya", _is_kohya),
    ("kohya-bundle", _is_kohya_bundle),
    ("diffusers-attn-processor", _is_attn_processor),
    ("diffusers-old", _is_diffusers_old),
    ("peft", _is_peft),
    ("embedding-diffusers", lambda keys, shapes: len(keys) == 1),
]

KOHYA_FORMATS = ("kohya", "kohya-locon")
LYCORIS_FORMATS = ("lycoris-loha", "lycoris-lokr", "dora")
PEFT_FORMATS = ("peft", "diffusers-old", "diffusers-attn-processor")
EMBEDDING_FORMATS = ("embedding-kohya", "embedding-sdxl", "embedding-diffusers")


def detect_format(keys: Iterable[str], shapes: Shapes | None = None) -> str:
    """The first format of :data:`FORMATS` whose predicate holds for these tensor names.

    Raises :class:`FormatError` listing the formats tried and the first 8 keys when none does.
    """
    names = sorted(keys)
    if not names:
        raise FormatError("the file holds no tensors, so it is no adapter format")
    for name, predicate in FORMATS:
        if predicate(names, shapes or {}):
            return name
    tried = ", ".join(name for name, _ in FORMATS)
    shown = "\n".join(f"  {k}" for k in names[:8])
    more = f"\n  ... ({len(names) - 8} more)" if len(names) > 8 else ""
    raise FormatError(f"unrecognised adapter file; tried {tried}. First keys:\n{shown}{more}")


# Text-encoder width / UNet cross-attention width -> family name.
_TE_WIDTHS = {768: "sd15", 1024: "sd2", 128: "tiny"}
_CROSS_ATTENTION_WIDTHS = {768: "sd15", 1024: "sd2", 2048: "sdxl", 128: "tiny"}


def detect_family(metadata: Mapping[str, str], shapes: Shapes) -> str | None:
    """Best guess of the family name (``sd15``, ``sd2``, ``sdxl``, ``tiny``), or None if there is no evidence.

    In order: the ``family`` of tuner's block; ``ss_base_model_version`` (``sd_v1`` -> sd15, ``sd_v2*`` ->
    sd2, ``sdxl_*`` -> sdxl; because tiny files also say ``sd_v1``, an ``sd15`` answer gives way to tiny
    when the tensor widths say 128); then the tensors alone (see :func:`family_from_shapes`).
    """
    block = read_tuner_block(metadata)
    if block and isinstance(block.get("family"), str):
        return block["family"]
    from_shapes = family_from_shapes(shapes)
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "tiny" if from_shapes == "tiny" else "sd15"
    return from_shapes


def family_from_shapes(shapes: Shapes) -> str | None:
    """Family from tensor widths: a second text encoder (``lora_te2_``/``text_encoder_2.``/``clip_g``) means
    SDXL; else the text-encoder width (q_proj input, or an embedding's width); else the UNet
    cross-attention width (``attn2`` ``to_k`` input)."""
    te_width = cross_width = None
    for key, shape in shapes.items():
        if key.startswith(("lora_te2_", "text_encoder_2.")) or key == "clip_g":
            return "sdxl"
        if not shape:
            continue
        is_down = key.endswith(
            (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".down.weight", ".hada_w1_b")
        )
        if is_down and len(shape) == 2 and re.search(r"[._]q_proj[._]", key):
            # only text encoders have q_proj (the UNet says to_q)
            te_width = shape[1]
        elif is_down and re.search(r"attn2[._]to_k[._]", key):
            cross_width = shape[1]
        elif key in ("emb_params", "emp_params") and len(shape) == 2:
            te_width = shape[1]
    if te_width is not None and te_width in _TE_WIDTHS:
        return _TE_WIDTHS[te_width]
    if cross_width is not None:
        return _CROSS_ATTENTION_WIDTHS.get(cross_width)
    return None
