"""Full-size architectures with random weights, built from config (no download): for benchmarks and for
tests that need the real topology and sizes (memory, key names) but not trained weights."""

from __future__ import annotations

from typing import Any

import torch

from tuner.models.base import BaseModel
from tuner.models.families import SD15

SD15_VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)  # fmt: skip

SD15_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip


def sd15_random_base(seed: int = 0) -> BaseModel:
    """SD1.5's UNet (860M), VAE and CLIP ViT-L text encoder with random weights, fp32, on the CPU.

    The tokenizer is the tiny base's (the real CLIP vocabulary is not needed for memory or key names; its
    ids stay below SD1.5's 49408-token embedding table).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tuner.formats.skeleton import SD15_TEXT_CONFIG, SD15_UNET_CONFIG
    from tuner.models.tiny import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    return BaseModel(
        family=SD15,
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG).eval(),
        vae=AutoencoderKL(**SD15_VAE_CONFIG).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).eval(),
        tokenizer=tokenizer,
        scheduler_config=dict(SD15_SCHEDULER_CONFIG),
        source="sd15-random",
        is_random=True,
    )
