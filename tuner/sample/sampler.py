"""The built-in sampler (CLI ``tuner sample`` and training previews).

Same maths as diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (classifier-free
guidance with ``[uncond, cond]`` batches, initial noise ``randn(generator) * init_noise_sigma`` on the CPU,
SDXL's pooled embedding and size/crop time ids, an empty negative prompt as zero embeds where the family
says so, output ``(x / 2 + 0.5).clamp(0, 1)`` rounded to uint8), so with the same scheduler, seed, steps
and CFG they give the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tuner.errors import TunerError
from tuner.models.base import BaseModel
from tuner.models.prompts import Conditioning, encode_conditioning, unet_kwargs
from tuner.optim.memory import compute_dtype

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")


def make_scheduler(name: str, scheduler_config: dict):
    """A diffusers inference scheduler for ``name``, built from the base's scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return classes[name].from_config(scheduler_config)


@dataclass
class SampleSettings:
    steps: int = 25
    cfg: float = 5.0
    sampler: str = "ddim"
    width: int = 0
    """0 = the family's native resolution."""
    height: int = 0
    negative: str = ""
    batch_size: int = 1
    """Images denoised together. Each image's noise comes from its own seed's generator, so it does not
    depend on its batch (up to the float rounding of batched kernels); 1 keeps memory flat on small machines,
    more is faster where a step is overhead-bound (small models, GPUs)."""


@torch.no_grad()
def sample_images(
    base: BaseModel, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, ``settings.batch_size`` at a time."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    width = settings.width or base.family.resolution
    height = settings.height or base.family.resolution
    f = base.vae_scale_factor
    if width <= 0 or height <= 0 or width % f or height % f:
        # user input (``tuner sample --size``): a TunerError, so the CLI shows a message, not a traceback
        raise TunerError(
            f"image size {width}x{height}: width and height must be positive multiples of {f} for this base "
            f"(e.g. {base.family.resolution}x{base.family.resolution})"
        )
    unet, vae = base.unet, base.vae
    device, dtype = next(unet.parameters()).device, compute_dtype(unet)
    guided = settings.cfg > 1.0
    uncond = None
    if guided and not (settings.negative == "" and base.family.zero_empty_negative):
        uncond = encode_conditioning(base, [settings.negative]).to(dtype)
    images = []
    size = max(1, settings.batch_size)
    for start in range(0, len(prompts), size):
        chunk, chunk_seeds = list(prompts[start : start + size]), seeds[start : start + size]
        scheduler = make_scheduler(settings.sampler, base.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=device)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in chunk_seeds]
        shape = (1, unet.config.in_channels, height // f, width // f)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=dtype) for g in generators])
        latents = noise.to(device) * scheduler.init_noise_sigma
        cond = encode_conditioning(base, chunk).to(device, dtype)
        if guided:
            negative = Conditioning.cat([uncond] * len(chunk)).to(device) if uncond is not None else cond.zeros_like()
            cond = Conditioning.cat([negative, cond])
        inputs = unet_kwargs(base.family, cond, target_size=(height, width))
        # ancestral samplers draw each image's noise from its own generator (diffusers takes a list)
        step_generator = generators[0] if len(generators) == 1 else generators
        for t in scheduler.timesteps:
            x = torch.cat([latents] * 2) if guided else latents
            x = scheduler.scale_model_input(x, t)
            pred = unet(x, t, **inputs).sample
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + settings.cfg * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, generator=step_generator).prev_sample
        vae_device = next(vae.parameters()).device  # the VAE may sit on the CPU after latent caching
        decoded = vae.decode((latents / base.latent_scale).to(vae_device, vae.dtype)).sample
        images += [to_pil(image) for image in decoded]
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> RGB PIL image, rounded like diffusers' image processor."""
    arr = (image.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size tiled in rows of ``cols`` (default: near-square)."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * w, (i // cols) * h))
    return canvas
