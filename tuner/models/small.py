"""Small random bases with the exact block topology of a real family, built from the family's shipped configs
(no download): same block types, layers per block, transformer depths and text-encoder layer counts, and
the real CLIP vocabulary and tokenizers, at tiny widths (changing from block to block where the real ones do).

Module names (and so kohya key names) depend on the topology, not on widths, so a LoRA trained on
``small_base("sdxl")`` has exactly the key names kohya writes for SDXL base; tests use these bases to
train, export and sample every family on a CPU in seconds. Attention heads follow the rule single-file
loading uses (64 channels per head, at least one), so a small base saved as a single file loads back as the
same model.
"""

from __future__ import annotations

from typing import Any

import torch

from tuner.errors import TunerError
from tuner.models.base import BaseModel
from tuner.models.families import Family, get_family

# Widths per family: UNet block widths and text-encoder hidden sizes (the pooled encoder's projection is half
# its width). The UNet's cross-attention width is the sum of the encoder widths, as in the real models.
# Widths change where the real ones change (320 -> 640 -> 1280): a resnet whose width changes has a
# ``conv_shortcut``, which LoCon adapts, so equal neighbouring widths would drop modules.
UNET_WIDTHS = {"sd15": [32, 64, 96, 96], "sd2": [32, 64, 96, 96], "sd2v": [32, 64, 96, 96], "sdxl": [32, 64, 96]}
TEXT_WIDTHS = {"text_encoder": 32, "text_encoder_2": 64}
VAE_WIDTHS = [32, 32, 64, 64]
ADDITION_TIME_EMBED_DIM = 8


def small_configs(family: Family) -> dict[str, dict[str, Any]]:
    """Component -> config (UNet, VAE, text encoders) of the small model of ``family``."""
    from tuner.models.single_file import family_config

    if family.name not in UNET_WIDTHS:
        raise TunerError(f"no small topology for family {family.name!r}; known: {', '.join(UNET_WIDTHS)}")
    configs: dict[str, dict[str, Any]] = {}
    projection = 0
    for spec in family.text_encoders:
        cfg = family_config(family, spec.component)
        hidden = TEXT_WIDTHS[spec.component]
        cfg.update(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=max(1, hidden // 64))
        if spec.pooled:
            projection = cfg["projection_dim"] = hidden // 2
        configs[spec.component] = cfg
    unet = family_config(family, "unet")
    widths = UNET_WIDTHS[family.name]
    unet.update(block_out_channels=widths, cross_attention_dim=sum(TEXT_WIDTHS[te.component] for te in family.text_encoders))
    if isinstance(unet["attention_head_dim"], list):  # SD2/SDXL: 64 channels per head
        unet["attention_head_dim"] = [max(1, w // 64) for w in widths]
    if family.added_conditioning:
        unet.update(addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
                    projection_class_embeddings_input_dim=projection
                    + 2 * len(family.added_conditioning) * ADDITION_TIME_EMBED_DIM)
    configs["unet"] = unet
    vae = family_config(family, "vae")
    vae.update(block_out_channels=list(VAE_WIDTHS))
    configs["vae"] = vae
    return configs


def small_base(family_name: str, seed: int = 0) -> BaseModel:
    """A random small base of ``family_name`` (``sd15``, ``sd2``, ``sd2v``, ``sdxl``), fp32, on the CPU, with
    the family's scheduler config and tokenizers."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tuner.models.single_file import build_tokenizer, scheduler_config

    family = get_family(family_name)
    configs = small_configs(family)
    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_config(configs["unet"]).eval(),
        "vae": AutoencoderKL.from_config(configs["vae"]).eval(),
    }
    for spec in family.text_encoders:
        cfg = dict(configs[spec.component])
        model_class = getattr(transformers, spec.model_class)
        cfg.pop("architectures", None)
        parts[spec.component] = model_class(transformers.CLIPTextConfig(**cfg)).eval()
        parts[spec.tokenizer] = build_tokenizer(family, spec.tokenizer)
    return BaseModel(family=family, scheduler_config=scheduler_config(family), source=f"small-{family.name}",
                     is_random=True, **parts)
