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


def sd15_random_base(seed: int = 0, device: str | torch.device = "cpu") -> BaseModel:
    """SD1.5's UNet (860M), VAE and CLIP ViT-L text encoder with random weights, fp32, on ``device``
    (built there directly: a GPU initialises the weights in a fraction of the CPU's time).

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
    with torch.device(device):
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


def sdxl_random_base(seed: int = 0, device: str | torch.device = "cpu") -> BaseModel:
    """SDXL base's UNet (2.57B), VAE and both text encoders (CLIP ViT-L, OpenCLIP ViT-bigG with projection)
    with random weights, fp32, on ``device``, from the configs shipped in ``tuner/models/configs/sdxl``,
    with SDXL's real tokenizers. About 14 GB in fp32: build it on a GPU or a large-memory machine."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tuner.models.families import SDXL
    from tuner.models.single_file import build_tokenizer, family_config, scheduler_config

    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    with torch.device(device):
        parts["unet"] = UNet2DConditionModel.from_config(family_config(SDXL, "unet")).eval()
        parts["vae"] = AutoencoderKL.from_config(family_config(SDXL, "vae")).eval()
        for spec in SDXL.text_encoders:
            cfg = family_config(SDXL, spec.component)
            cfg.pop("architectures", None)
            model_class = getattr(transformers, spec.model_class)
            parts[spec.component] = model_class(transformers.CLIPTextConfig(**cfg)).eval()
    for spec in SDXL.text_encoders:
        parts[spec.tokenizer] = build_tokenizer(SDXL, spec.tokenizer)
    return BaseModel(
        family=SDXL, scheduler_config=scheduler_config(SDXL), source="sdxl-random", is_random=True, **parts
    )
