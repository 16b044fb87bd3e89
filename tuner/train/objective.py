"""The diffusion training objective: noise, timesteps, targets, min-SNR weighting.

Latents enter already scaled (``latent_dist.sample() * latent_scale``). Timesteps are int64 in
``[0, num_train_timesteps)``. Every random draw takes an explicit generator, so a step is reproducible from
``(seed, step)`` alone (exact resume without saved RNG state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tuner.train.distributed import Shard


def add_noise(
    latents: torch.Tensor,
    noise_scheduler,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    shard: Shard = Shard(),
    parts: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(noisy_latents, noise, timesteps)``. ``noise_offset`` adds per-channel constant noise
    (lets the model learn very dark/bright images). With several processes (``shard``) the draws are made for
    the global batch and ``latents`` are this process's rows of it, laid out in ``parts``
    (:meth:`~tuner.train.distributed.Shard.rows`)."""
    b, c = latents.shape[:2]
    noise = shard.randn(latents.shape, generator, parts).to(latents)
    if noise_offset:
        noise = noise + noise_offset * shard.randn((b, c, 1, 1), generator, parts).to(latents)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = shard.randint(steps, b, generator, parts).to(latents.device)
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def target_for(prediction_type: str, latents, noise, timesteps, noise_scheduler) -> torch.Tensor:
    """What the UNet must predict: the noise (``epsilon``) or the velocity (``v_prediction``)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    *,
    prediction_type: str,
    min_snr_gamma: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE ``[B]`` in fp32, weighted by min-SNR-gamma when ``min_snr_gamma > 0``
    (Hang et al. 2023: weight ``min(snr, gamma) / snr`` for epsilon, ``/ (snr + 1)`` for v).

    ``weight``: optional per-element weights broadcastable to ``pred`` (e.g. ``[B, 1, H, W]``, a latent-space
    mask): each sample's loss is then the weighted mean ``sum(w * err) / sum(w)``, so its scale stays that
    of the plain MSE."""
    dims = tuple(range(1, pred.ndim))
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weight is None:
        loss = err.mean(dim=dims)
    else:
        w = weight.float().expand_as(err)
        loss = (w * err).sum(dim=dims) / w.sum(dim=dims).clamp(min=1e-12)
    if min_snr_gamma > 0:
        s = snr(noise_scheduler, timesteps)
        clipped = torch.clamp(s, max=min_snr_gamma)
        # a zero-terminal-SNR schedule has snr == 0 at its last step: keep epsilon's weight finite there
        weight = clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s.clamp(min=1e-8)
        loss = loss * weight
    return loss
