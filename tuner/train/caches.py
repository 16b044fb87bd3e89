"""Caching before training: latents (frozen VAE) and prompt conditioning (frozen text encoders), after which
those components leave the training device (they are needed again only for previews and export).

Cached and uncached training are the same computation: cached latents keep the VAE's distribution and are
sampled each step from the step's generator; cached prompt embeds are what the frozen encoders return.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tuner.data.dataset import TrainDataset
from tuner.errors import TunerError
from tuner.optim.memory import offload
from tuner.train.batches import cache_latent_moments, prompt_embeds_for
from tuner.train.setup import Run

PROMPT_CHUNK = 32
"""Captions encoded per text-encoder call while caching (bounds the transient activation memory)."""


def fixed_captions(datasets: Sequence[TrainDataset]) -> list[str] | None:
    """Every caption training can draw from ``datasets``, or None when they are not known in advance.

    Without tag shuffling a caption is the item's own caption or, with caption dropout, ``""``: a finite
    set, so dropout does not prevent caching. Tag shuffling makes a new caption at every draw (None)."""
    out: dict[str, None] = {}
    for dataset in datasets:
        if dataset.shuffle_tags:
            return None
        out.update((item.caption, None) for item in dataset.index.items)
        if dataset.caption_dropout > 0:
            out[""] = None
    return list(out)


def cache_latents(run: Run, log=print) -> None:
    """Encode every (image, flip) once; then move the VAE off the device. Refuses non-finite latents
    (an fp16 VAE overflows) with the fix. A second call does nothing."""
    if run.latent_cache is not None:
        return
    flips = run.recipe.data.flip
    run.latent_cache = cache_latent_moments(run.dataset, run.base.vae, flips, run.device)
    if run.class_dataset is not None:
        run.class_latent_cache = cache_latent_moments(run.class_dataset, run.base.vae, flips, run.device)
    for cache in (run.latent_cache, run.class_latent_cache or {}):
        for (item, _), (mean, std) in cache.items():
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise TunerError(
                    f"the VAE returned NaN/inf latents for image {item} (VAE stored as "
                    f"{str(next(run.base.vae.parameters()).dtype).removeprefix('torch.')}): the SD VAEs "
                    'overflow in fp16. Set model.vae_dtype = "fp32" (or train.mixed_precision = "bf16")'
                )
    offload(run.base.vae)
    run.offloaded.append("vae")
    cached = len(run.latent_cache) + len(run.class_latent_cache or ())
    log(f"cached latents of {cached} image views; VAE moved off the training device")


def cache_prompts(run: Run, log=print) -> None:
    """With frozen text encoders: an empty cache filled as captions come; when every caption is known in
    advance (:func:`fixed_captions`), all of them are encoded now and the text encoders leave the device.
    A second call does nothing."""
    if run.prompt_cache is not None:
        return
    run.prompt_cache = {}
    datasets = [run.dataset] + ([run.class_dataset] if run.class_dataset is not None else [])
    captions = fixed_captions(datasets)
    if captions is None:
        log("data.shuffle_tags makes a new caption every step: prompt embeds are cached as they come and the "
            "text encoder stays on the training device")
        return
    for start in range(0, len(captions), PROMPT_CHUNK):
        prompt_embeds_for(captions[start : start + PROMPT_CHUNK], base=run.base, cache=run.prompt_cache)
    for name, encoder in run.base.text_encoders.items():
        offload(encoder)
        run.offloaded.append(name)
    log(f"cached prompt embeds of {len(captions)} captions; text encoder moved off the training device")

