"""From data to UNet inputs: deterministic batches, cached latents and cached prompt embeds.

Micro-batch ``k`` takes positions ``k*B .. k*B+B-1`` of an endless stream made of each epoch's permutation
in turn (with aspect-ratio buckets: batch ``k mod n`` of epoch ``k div n``, each from one bucket), so any
step's data is known from ``(seed, k)``: resuming mid-epoch replays the exact order. Cached latents are per
image, at its bucket's size, so a batch of one bucket stacks.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tuner.data.dataset import Batch, TrainDataset, collate
from tuner.models.prompts import Conditioning, encode_conditioning
from tuner.train.distributed import Shard


def batch_at(dataset: TrainDataset, micro_step: int, batch_size: int) -> Batch:
    """Micro-batch ``micro_step`` (see :meth:`TrainDataset.batch_samples`; with buckets it may be smaller than
    ``batch_size`` and its pixels are its bucket's size)."""
    return collate([dataset.get(i, epoch) for epoch, i in dataset.batch_samples(micro_step, batch_size)])


@torch.no_grad()
def cache_latent_moments(
    dataset: TrainDataset, vae, flips: bool, device: torch.device
) -> dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]:
    """Encode each image once (centre crop, and its mirror when flipping): (item, flipped) -> (mean, std)
    of the VAE's latent distribution, unscaled, on the CPU. Sampling from them each step keeps the VAE's
    noise, so cached and uncached training draw the same latents from the same generator."""
    cache = {}
    keys = [(i, f) for i in range(len(dataset.index.items)) for f in ((False, True) if flips else (False,))]
    for item, flipped in tqdm(keys, desc="caching latents", unit="img", leave=False):
        pixels = dataset.deterministic_example(item, flipped)[None].to(device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        cache[(item, flipped)] = (dist.mean[0].float().cpu(), dist.std[0].float().cpu())
    return cache


def latents_for(
    batch: Batch,
    *,
    vae,
    latent_scale: float,
    generator: torch.Generator,
    cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None,
    device: torch.device,
    shard: Shard = Shard(),
) -> torch.Tensor:
    """Scaled latents ``[B, C, h, w]`` (fp32, on ``device``) for a batch, from the cache or the VAE. With
    several processes the VAE's noise is drawn for the global batch and this process keeps its rows."""
    if cache is not None:
        mean = torch.stack([cache[(i, f)][0] for i, f in zip(batch.item_indices, batch.flipped)])
        std = torch.stack([cache[(i, f)][1] for i, f in zip(batch.item_indices, batch.flipped)])
    else:
        with torch.no_grad():
            dist = vae.encode(batch.pixel_values.to(device, vae.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
    eps = shard.randn(mean.shape, generator)
    return ((mean + std * eps) * latent_scale).to(device)


def prompt_embeds_for(captions: list[str], *, base, cache: dict[str, Conditioning] | None) -> Conditioning:
    """Prompt conditioning (:func:`~tuner.models.prompts.encode_conditioning`) of ``captions``; with a cache
    (frozen text encoders) each distinct caption is encoded once."""
    if cache is None:
        return encode_conditioning(base, captions)
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    if missing:
        with torch.no_grad():
            encoded = encode_conditioning(base, missing)
            for i, caption in enumerate(missing):
                cache[caption] = encoded.row(i)
    return Conditioning.cat([cache[c] for c in captions])
