"""The module keys of a family's models without loading any weight: what kohya names resolve against
when a file is converted or merged with no base model at hand.

The models are built from their configs on PyTorch's ``meta`` device (no memory, no download); only
module names matter, and those depend on the block topology, not on widths.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.models.families import Family

# Topology of SD1.x's UNet and text encoder (widths included, so shapes can be checked too).
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SD15_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip


@cache
def family_module_keys(family_name: str) -> tuple[str, ...]:
    """Canonical keys (``unet:...``, ``text_encoder:text_model....``, ``text_encoder_2:...``) of every
    Linear/Conv2d of the family's UNet and text encoders. Families with shipped configs (SD2, SDXL) are
    built from those. :class:`TunerError` for a family without a known skeleton."""
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tuner.adapters.lora import candidate_keys
    from tuner.models.families import get_family

    family = get_family(family_name)
    with torch.device("meta"):
        if family_name in ("tiny", "sd15"):
            if family_name == "tiny":
                from tuner.models.tiny import text_encoder_config
                from tuner.plan.skeleton import component_configs

                # the UNet the install ships (a re-pretrained base may have other blocks), else the built-in one
                unet_config: dict[str, Any] = component_configs("tiny")[1]["unet"]
                text_config = text_encoder_config(1000, 0, 1)
            else:
                unet_config, text_config = dict(SD15_UNET_CONFIG), dict(SD15_TEXT_CONFIG)
            models: dict[str, torch.nn.Module] = {
                "unet": UNet2DConditionModel(**unet_config),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config)),
            }
        elif family.configs is not None:
            from tuner.models.single_file import family_config

            models = {"unet": UNet2DConditionModel.from_config(family_config(family, "unet"))}
            for spec in family.text_encoders:
                config = CLIPTextConfig(**family_config(family, spec.component))
                models[spec.component] = getattr(transformers, spec.model_class)(config)
        else:
            raise TunerError(
                f"family {family_name!r}: converting or merging kohya-named files needs its module names, "
                "which tuner does not know for it"
            )
    return tuple(candidate_keys(models))


def kohya_table_for(family: Family) -> dict[str, str]:
    """kohya name (and accepted aliases, e.g. SD1 LDM names) -> canonical key, for ``family``."""
    from tuner.formats.kohya import kohya_name_table

    return kohya_name_table(family, family_module_keys(family.name))
