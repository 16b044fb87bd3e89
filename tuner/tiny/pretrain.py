"""Pretraining the embedded tiny base from scratch on the toy world (``tuner pretrain-tiny``).

Two stages, each resumable from its own checkpoint so the job can run in parts (``--time-limit``):

1. the VAE (4x downsampling, 64 px -> 16x16x4; 2x and 32x32x4 with ``latent_factor = 2``), reconstruction
   + a small KL term; its latent scaling factor is set to 1 / std of the latents of the world's images;
2. the text encoder and the UNet together, on latents of every pretraining scene (cached once: the world
   has a finite set of distinct images) with captions re-drawn every time (size and position phrases each
   dropped with p = 0.3 per WORLD.md, the colour word with ``color_drop`` so that colourless class prompts
   work, and the whole caption dropped with ``caption_dropout`` for CFG).
   v-prediction on a zero-terminal-SNR schedule (see ``tuner.models.tiny.SCHEDULER_CONFIG``), plain MSE by
   default; an EMA of the weights is what ships.

This is a separate job from personalization (``tuner.train``): it trains everything from random init and
has no adapter, so it does not go through the adapter loop.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tuner.formats.io import write_text_atomic
from tuner.tiny import world
from tuner.train.distributed import Shard, broadcast_parameters, step_totals, sync_gradients

CPU = torch.device("cpu")

STATE_VAE = "vae_state.pt"
STATE_UNET = "unet_state.pt"
STATE_DECODER = "decoder_state.pt"


@dataclass
class PretrainSettings:
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_augment: float = 0.5
    """Share of each VAE batch drawn by :func:`codec_augment` (world geometry in free colours, with nested
    shapes) instead of world scenes: a codec that only ever saw the palette's eight colours and single
    shapes loses what personalization adds (the sks subject's small white centre, ``<pink>``)."""
    vae_fg_weight: float = 4.0
    """Extra reconstruction weight on object pixels (mask dilated by one pixel): each weighs
    ``1 + vae_fg_weight``. A small object is 2-8% of an image; with a plain mean its detail barely counts."""
    steps: int = 3800
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_snr_gamma: float = 0.0
    """0 = plain v-prediction loss. Min-SNR weights the noisiest steps (where layout is decided) near zero."""
    caption_dropout: float = 0.1
    color_drop: float = 0.2
    """Leave the colour word out of this share of captions. WORLD.md's captions always name the colour, but
    DreamBooth's class prompts (``a star on a blue background``) do not: a base that never saw a colourless
    caption ignores such a prompt altogether (wrong shape and background). 0 = WORLD.md's captions only."""
    fg_weight: float = 4.0
    """Extra loss weight on the object: each latent pixel under the (dilated) object mask weighs
    ``1 + fg_weight`` in the UNet's loss. The object covers 5-30% of an image, so with a plain MSE the
    background dominates; small shapes' outlines are what the base draws worst. 0 = plain MSE."""
    ema_decay: float = 0.999
    latent_factor: int = 4
    """Pixels per latent cell, 4 (the shipped base: 16x16x4 latents) or 2 (32x32x4, a UNet with one more
    stage; :func:`tuner.models.tiny.unet_config`). With 4 the small sks star, a 20 px hexagram, is 5 latent
    cells across and its white centre is lost in half of the VAE's round trips."""
    snr_shift: float = 0.0
    """Divide the noise schedule's SNR by this (:func:`tuner.models.tiny.scheduler_config`); 0 = by the ratio
    of latent cells to the shipped base's, ``(latent_factor / 4)^-2``: 1 for factor 4, 4 for factor 2. Without
    it a 32x32-latent UNet takes the object's position from the noise, not the prompt."""
    init_from: str = ""
    """A tiny base (a diffusers folder, or ``tiny`` for the embedded one) whose text encoder and UNet start
    stage 2 instead of random weights: every UNet tensor that has a counterpart of the same shape (a factor-4
    base's stages are the inner stages of a factor-2 UNet) is copied; the rest, and the VAE, start fresh.
    What the first factor-2 bases learned last and worst from scratch (position from the prompt) the
    factor-4 base already knows. "" = from scratch."""
    decoder_steps: int = 0
    """Stage 3: fine-tune the VAE decoder alone on the frozen encoder's latents (the UNet's latent space does
    not change, so the denoiser stays valid); sharpens small shapes. 0 = skip."""
    decoder_batch: int = 32
    decoder_lr: float = 5e-4
    checkpoint_every: int = 250
    share_cpu: bool = False
    """Drop to one torch thread whenever another process is running (see :func:`fair_threads`)."""
    time_limit_min: float = 0.0
    """Stop (with a checkpoint) after this many minutes of this invocation; 0 = no limit."""
    scene_limit: int = 0
    """Use only the first N distinct scenes (smoke tests); 0 = all of them."""


def pretrain_scenes() -> list[world.Scene]:
    """Every distinct plain scene of the pretraining split (held-out (shape, colour) pairs excluded)."""
    held = set(world.HELD_OUT)
    scenes = []
    for shape, color, bg, size, pos in itertools.product(
        world.SHAPES, world.PALETTE, world.PALETTE, world.SIZES, world.POSITIONS
    ):
        if color != bg and (shape, color) not in held:
            scenes.append(world.Scene(shape=shape, color=color, background=bg, size=size, position=pos))
    return scenes


def _object_weights(scenes: list[world.Scene], fg_weight: float, factor: int = 4) -> torch.Tensor:
    """``[N, 1, 64 / factor, 64 / factor]`` loss weights: ``1 + fg_weight`` where the latent pixel (after a
    3x3 dilation) overlaps the scene's object, else 1."""
    masks = np.stack([world.shape_mask(s.shape, s.size_px, s.cx) for s in scenes]).astype(np.float32)
    m = F.avg_pool2d(torch.from_numpy(masks)[:, None], factor)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    return 1.0 + fg_weight * (m > 0).float()


def draw_captions(rng: np.random.Generator, scenes: list[world.Scene], s: PretrainSettings) -> list[str]:
    """One training caption per scene: WORLD.md's phrase dropping (size and position, p = 0.3 each), the
    colour word dropped with ``s.color_drop`` and the whole caption with ``s.caption_dropout`` (for CFG)."""
    drops = rng.random((len(scenes), 4 if s.color_drop > 0 else 3))  # 3 columns: older runs resume unchanged
    return [
        "" if d[2] < s.caption_dropout
        else world.caption(scene, drop_size=bool(d[0] < world.PHRASE_DROP_P),
                           drop_position=bool(d[1] < world.PHRASE_DROP_P),
                           drop_color=bool(s.color_drop > 0 and d[3] < s.color_drop))
        for scene, d in zip(scenes, drops)
    ]


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _lr_at(step: int, settings_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return settings_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return settings_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _own_running_threads() -> int:
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text(encoding="ascii")
        except OSError:
            continue
        count += stat[stat.rindex(")") + 2] == "R"
    return count


def fair_threads(max_threads: int) -> None:
    """Use one torch thread while another process wants the CPU, all of them otherwise.

    On a small shared machine, oversubscribed torch threads spin against each other and a step can get
    an order of magnitude slower; one thread each is far better. Counts runnable threads system-wide
    (``/proc/loadavg``) minus this process's own.
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            runnable = int(fh.read().split()[3].split("/")[0])
        others = runnable - _own_running_threads()
    except (OSError, ValueError, IndexError):
        return
    torch.set_num_threads(max_threads if others <= 0 else 1)


class _Clock:
    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + minutes * 60 if minutes > 0 else math.inf

    def out(self) -> bool:
        return time.monotonic() > self.deadline


def local_shard() -> Shard:
    """This process's place in a data-parallel pretraining (``tuner pretrain-tiny --processes N`` starts the
    processes with ``torch.distributed.run``; the gloo process group is created here on first use)."""
    import torch.distributed as dist

    from tuner.train.launch import launched_processes

    world = launched_processes()
    if world == 1:
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Shard(rank=dist.get_rank(), world=world)


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, step: int, shard: Shard,
          clock: _Clock) -> tuple[int, float, bool]:
    """One optimizer step on ``loss``, this process's mean over its rows of the batch (gradients averaged over
    the processes, then clipped to norm 1). Returns the new step count, the batch's loss and whether to pause
    here: one decision for every process (the main process's clock)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sync_gradients(params, shard.world, CPU)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    value, stop = step_totals(loss.item(), shard.is_main and clock.out(), shard.world, CPU)
    return step + 1, value, stop


def _resume(path: Path, model, opt, rng, log, stage: str) -> int:
    """Load a stage's saved state (the twin of :func:`_checkpoint`); returns the step to continue from."""
    state = _load(path)
    if not state:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]
    log(f"{stage}: resumed at step {state['step']}")
    return int(state["step"])


def _latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's posterior mean and std of every image (chunks of 256), computed once per stage."""
    moments = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    return torch.cat([d.mean for d in moments]), torch.cat([d.std for d in moments])


def _checkpoint(path: Path, model, opt, rng, step: int, total: int, s: PretrainSettings, stop: bool, shard: Shard,
                bar, log, stage: str) -> bool:
    """Save the stage's state when due (the main process writes); True when the time limit pauses it here."""
    if step % s.checkpoint_every == 0 or step == total or stop:
        if shard.is_main:
            _save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "rng": rng.bit_generator.state, "step": step})
        if stop and step < total:
            bar.close()
            log(f"{stage}: time limit reached at step {step}; run again to continue")
            return True
    return False


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """MSE + 0.5 L1 per pixel, averaged per image with pixels under the (one-pixel dilated) object ``mask``
    (``[N, 1, H, W]`` bool) weighing ``1 + fg_weight``, then over images (so that the mean over any split of
    the batch is the mean of the parts'); with ``fg_weight = 0`` the plain mean."""
    err = (recon - x).pow(2) + 0.5 * (recon - x).abs()
    if fg_weight <= 0:
        return err.mean()
    weight = 1.0 + fg_weight * F.max_pool2d(mask.float(), 3, stride=1, padding=1)
    per_image = (err * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * x.shape[1])
    return per_image.mean()


def train_vae(out: Path, s: PretrainSettings, scenes: list[world.Scene], clock: _Clock, log=print,
              shard: Shard = Shard()):
    """Stage 1. Returns the trained VAE, or None when the time limit stopped it (checkpoint saved)."""
    from diffusers import AutoencoderKL

    from tuner.models.tiny import vae_config

    final = out / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final, local_files_only=True)
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**vae_config(s.latent_factor))
    broadcast_parameters(list(vae.parameters()), shard.world)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(s.seed)
    step = _resume(out / STATE_VAE, vae, opt, rng, log, "VAE")
    pixels = world.scene_pixels(scenes)
    masks = torch.from_numpy(np.stack([world.scene_mask(sc) for sc in scenes]))[:, None]
    n_aug = round(s.vae_batch * s.vae_augment)
    gen = torch.Generator().manual_seed(s.seed + step)
    rows = shard.rows((s.vae_batch // shard.world,))
    bar = tqdm(total=s.vae_steps, initial=step, desc="VAE", unit="step", dynamic_ncols=True, disable=not shard.is_main)
    threads = torch.get_num_threads()
    while step < s.vae_steps:
        if s.share_cpu and step % 5 == 0:
            fair_threads(threads)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.vae_lr, 100, s.vae_steps)
        idx = torch.from_numpy(rng.integers(0, len(pixels), s.vae_batch - n_aug))
        x, mask = pixels[idx], masks[idx]
        if n_aug:
            extra, extra_mask = codec_augment(rng, n_aug, with_masks=True)
            x, mask = torch.cat([x, extra]), torch.cat([mask, extra_mask])
        x, mask = x[rows], mask[rows]  # the whole batch is drawn on every process; each trains its rows
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * shard.randn(dist.mean.shape, gen)
        recon = vae.decode(z).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = reconstruction_loss(recon, x, mask, s.vae_fg_weight) + s.vae_kl_weight * kl
        step, value, stop = _step(opt, list(vae.parameters()), loss, step, shard, clock)
        bar.set_postfix(loss=f"{value:.4f}")
        bar.update()
        if _checkpoint(out / STATE_VAE, vae, opt, rng, step, s.vae_steps, s, stop, shard, bar, log, "VAE"):
            return None
    bar.close()
    with torch.no_grad():
        lat = _latent_moments(vae, pixels)[0]
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    if shard.is_main:
        vae.save_pretrained(final)
    log(f"VAE: done, scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def train_denoiser(out: Path, s: PretrainSettings, scenes: list[world.Scene], vae, clock: _Clock, log=print,
                   shard: Shard = Shard()):
    """Stage 2: text encoder + UNet (``s`` as :func:`resolved` gives it, as :func:`pretrain_tiny` passes it).
    Returns (unet_ema, text_encoder_ema, history) or None when paused."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tuner.models.prompts import tokenize
    from tuner.models.tiny import build_tokenizer, scheduler_config, text_encoder_config, unet_config
    from tuner.train.objective import add_noise, diffusion_loss, target_for

    tokenizer = build_tokenizer()
    torch.manual_seed(s.seed + 1)
    unet = UNet2DConditionModel(**unet_config(s.latent_factor))
    te = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tokenizer), tokenizer.bos_token_id,
                                                            tokenizer.eos_token_id)))
    state = _load(out / STATE_UNET)
    if s.init_from and not state:  # a resumed run's checkpoint replaces these weights anyway
        log(init_from_base(unet, te, s.init_from, s.latent_factor))
    params = list(unet.parameters()) + list(te.parameters())
    broadcast_parameters(params, shard.world)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    sched = DDPMScheduler.from_config(scheduler_config(s.snr_shift))
    rng = np.random.default_rng(s.seed + 2)
    step, history = 0, {"loss": []}
    if state:
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["te"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_te.load_state_dict(state["ema_te"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step, history = state["step"], state["history"]
        log(f"UNet: resumed at step {step}")
    with torch.no_grad():
        pixels = world.scene_pixels(scenes)
        mean, std = _latent_moments(vae, pixels)
    # the weights' grid is the latents' (pixels per latent cell: the VAE's factor)
    weights = _object_weights(scenes, s.fg_weight, world.CANVAS // mean.shape[-1]) if s.fg_weight > 0 else None
    scale = float(vae.config.scaling_factor)
    unet.train()
    te.train()
    rows = shard.rows((s.batch // shard.world,))
    bar = tqdm(total=s.steps, initial=step, desc="UNet+TE", unit="step", dynamic_ncols=True, disable=not shard.is_main)
    threads = torch.get_num_threads()
    while step < s.steps:
        if s.share_cpu and step % 5 == 0:
            fair_threads(threads)
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.lr, s.warmup, s.steps)
        # The whole batch's draws happen on every process (cheap); each runs the models on its rows.
        idx = rng.integers(0, len(scenes), s.batch)
        captions = draw_captions(rng, [scenes[i] for i in idx], s)
        t_idx = torch.from_numpy(idx)
        latents = (mean[t_idx] + std[t_idx] * torch.randn(mean[t_idx].shape, generator=gen)) * scale
        noisy, noise, timesteps = add_noise(latents, sched, gen)
        target = target_for(sched.config.prediction_type, latents, noise, timesteps, sched)
        noisy, target, timesteps, t_idx = noisy[rows], target[rows], timesteps[rows], t_idx[rows]
        embeds = te(tokenize(tokenizer, [captions[i] for i in rows.tolist()]))[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        loss = diffusion_loss(pred, target, timesteps, sched, prediction_type=sched.config.prediction_type,
                              min_snr_gamma=s.min_snr_gamma,
                              weight=None if weights is None else weights[t_idx]).mean()
        step, value, stop = _step(opt, params, loss, step, shard, clock)
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in ((unet, ema_unet), (te, ema_te)):
                for p, e in zip(model.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        history["loss"].append(value)
        bar.set_postfix(loss=f"{np.mean(history['loss'][-50:]):.4f}")
        bar.update()
        if step % s.checkpoint_every == 0 or step == s.steps or stop:
            if shard.is_main:
                _save(out / STATE_UNET, {
                    "unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                    "ema_te": ema_te.state_dict(), "optimizer": opt.state_dict(), "rng": rng.bit_generator.state,
                    "step": step, "history": history,
                })
            if stop and step < s.steps:
                bar.close()
                log(f"UNet: time limit reached at step {step}; run again to continue")
                return None
    bar.close()
    return ema_unet.eval(), ema_te.eval(), history


def unet_counterpart(name: str, from_factor: int, to_factor: int) -> str:
    """The name in a ``from_factor`` tiny UNet of the tensor ``name`` of a ``to_factor`` one. A factor-2 UNet
    is a factor-4 one with a stage in front: its down block ``i + 1`` is the factor-4 down block ``i``; the
    up blocks keep their numbers (the new one comes last); everything else keeps its name."""
    shift = int(round(math.log2(from_factor / to_factor)))
    if shift and name.startswith("down_blocks."):
        index, rest = name[len("down_blocks."):].split(".", 1)
        return f"down_blocks.{int(index) - shift}.{rest}"
    return name


def init_from_base(unet, te, source: str, latent_factor: int) -> str:
    """Copy ``source``'s text encoder (all of it) and every UNet tensor with a same-shaped counterpart
    (:func:`unet_counterpart`) into ``unet`` and ``te``; returns a line saying how much was copied."""
    from tuner.errors import TunerError
    from tuner.models.base import load_base
    from tuner.models.families import TINY

    try:
        base = load_base(source)
    except TunerError as err:
        raise TunerError(f"--init-from {source}: {err}") from err
    if base.family is not TINY:
        raise TunerError(f"--init-from {source}: a {base.family.name} base, not a tiny one; start from a tiny base "
                         "(tiny, or a folder tuner pretrain-tiny wrote)")
    from_factor = base.vae_scale_factor
    their_te = base.text_encoder.state_dict()
    ours_te = te.state_dict()
    wrong = [k for k, v in ours_te.items() if k not in their_te or their_te[k].shape != v.shape]
    if wrong:
        raise TunerError(f"--init-from {source}: its text encoder does not match the tiny one ({wrong[0]} differs); "
                         "start from a tiny base that tuner pretrain-tiny wrote")
    te.load_state_dict(their_te)
    theirs = base.unet.state_dict()
    ours = unet.state_dict()
    copied = {}
    for name, value in ours.items():
        other = theirs.get(unet_counterpart(name, from_factor, latent_factor))
        if other is not None and other.shape == value.shape:
            copied[name] = other
    unet.load_state_dict(copied, strict=False)
    share = sum(v.numel() for v in copied.values()) / sum(v.numel() for v in ours.values())
    return (f"UNet and text encoder start from {source} (latent factor {from_factor}): the text encoder whole, "
            f"{len(copied)} of {len(ours)} UNet tensors ({share:.0%} of its weights); the rest start random")


def codec_augment(rng: np.random.Generator, n: int, *, with_masks: bool = False):
    """``n`` images of the world's geometry in arbitrary colours, ``[n, 3, 64, 64]`` in [-1, 1] (and with
    ``with_masks``, their object masks ``[n, 1, 64, 64]`` bool: both shapes).

    The VAE (``vae_augment``) and the decoder stage train on these beside the world's own scenes so that the
    VAE is a general codec and not a quantiser to the eight palette colours: a decoder that only ever saw the
    palette snaps a colour it never saw (``<pink>``) to the nearest palette entry, whatever the UNet learns,
    and one that never saw a shape inside a shape loses the sks subject's small white centre. Each image:
    one of the world's shapes (never the personalization concepts) at a random size and centre, random
    foreground and background colours at least 80 apart, and with probability 0.5 a second, smaller random
    shape in a third colour drawn over it (nested colour regions). The denoiser never sees these images.
    """
    out = np.empty((n, world.CANVAS, world.CANVAS, 3), dtype=np.float32)
    masks = np.zeros((n, world.CANVAS, world.CANVAS), dtype=bool)

    def colour(avoid: list[np.ndarray]) -> np.ndarray:
        while True:
            c = rng.uniform(0, 255, 3)
            if all(np.linalg.norm(c - a) >= 80 for a in avoid):
                return c

    for i in range(n):
        bg = colour([])
        fg = colour([bg])
        img = np.broadcast_to(bg, out.shape[1:]).copy()
        size = int(rng.integers(12, 41))
        cx, cy = int(rng.integers(14, 51)), int(rng.integers(20, 45))
        masks[i] = world.shape_mask(str(rng.choice(world.SHAPES)), size, cx, cy)
        img[masks[i]] = fg
        if rng.random() < 0.5:
            third = colour([bg, fg])
            small = int(rng.integers(4, max(5, size // 2)))
            ox, oy = cx + int(rng.integers(-size // 3, size // 3 + 1)), cy + int(rng.integers(-size // 3, size // 3 + 1))
            inner = world.shape_mask(str(rng.choice(world.SHAPES)), small, ox, oy)
            img[inner] = third
            masks[i] |= inner
        out[i] = img
    x = torch.from_numpy(out / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    return (x, torch.from_numpy(masks)[:, None]) if with_masks else x


def finetune_decoder(out: Path, s: PretrainSettings, scenes: list[world.Scene], vae, clock: _Clock, log=print,
                     shard: Shard = Shard()):
    """Stage 3: train only ``vae.decoder`` (and ``post_quant_conv``) on latents drawn from the frozen encoder.

    The encoder, and so the latent space the UNet was trained in, is untouched: this is the same move as
    Stable Diffusion's fine-tuned-decoder VAEs. Returns the VAE, or None when the time limit paused it.
    """
    done = out / "decoder"
    if (done / "config.json").exists():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(done, local_files_only=True)
    vae = copy.deepcopy(vae)
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=s.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng(s.seed + 3)
    step = _resume(out / STATE_DECODER, vae, opt, rng, log, "decoder")
    with torch.no_grad():
        pixels = world.scene_pixels(scenes)
        mean, std = _latent_moments(vae, pixels)
    gen = torch.Generator().manual_seed(s.seed + 4 + step)
    vae.decoder.train()
    value = float("nan")
    rows = shard.rows((s.decoder_batch // shard.world,))
    bar = tqdm(total=s.decoder_steps, initial=step, desc="decoder", unit="step", dynamic_ncols=True,
               disable=not shard.is_main)
    threads = torch.get_num_threads()
    while step < s.decoder_steps:
        if s.share_cpu and step % 5 == 0:
            fair_threads(threads)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.decoder_lr, 50, s.decoder_steps)
        n_world = s.decoder_batch // 2
        idx = torch.from_numpy(rng.integers(0, len(pixels), n_world))
        extra = codec_augment(rng, s.decoder_batch - n_world)
        with torch.no_grad():
            dist = vae.encode(extra).latent_dist
        z_mean, z_std = torch.cat([mean[idx], dist.mean]), torch.cat([std[idx], dist.std])
        z = (z_mean + z_std * torch.randn(z_mean.shape, generator=gen))[rows]
        recon = vae.decode(z).sample
        x = torch.cat([pixels[idx], extra])[rows]
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        step, value, stop = _step(opt, trainable, loss, step, shard, clock)
        bar.set_postfix(loss=f"{value:.4f}")
        bar.update()
        if _checkpoint(out / STATE_DECODER, vae, opt, rng, step, s.decoder_steps, s, stop, shard, bar, log, "decoder"):
            return None
    bar.close()
    vae.requires_grad_(False).eval()
    if shard.is_main:
        vae.save_pretrained(done)
    log(f"decoder: done after {step} steps (last loss {value:.4f})")
    return vae


def _check_same_architecture(out: Path, s: PretrainSettings) -> None:
    """Refuse to continue a run in ``out`` that was started with another ``latent_factor`` (its checkpoints
    hold the other architecture's weights) or ``snr_shift`` (they learned another noise schedule); runs
    from before the shift existed count as 1."""
    from tuner.errors import TunerError
    from tuner.models.tiny import LATENT_FACTORS

    if s.latent_factor not in LATENT_FACTORS:
        raise TunerError(f"latent_factor = {s.latent_factor}: expected one of {LATENT_FACTORS}")
    path = out / "settings.json"
    if not path.exists():
        return
    started = json.loads(path.read_text())
    for key, flag, default in (("latent_factor", "--latent-factor", 4), ("snr_shift", "--snr-shift", 1.0)):
        before, now = started.get(key, default), getattr(s, key)
        if before != now:
            raise TunerError(f"{path}: this run was started with {key} = {before}, not {now}; continue it with "
                             f"{flag} {before:g}, or start a new one in another --out folder")


def resolved(s: PretrainSettings) -> PretrainSettings:
    """``s`` with ``snr_shift`` 0 (automatic) replaced by its value for ``latent_factor``."""
    return replace(s, snr_shift=s.snr_shift or (4 / s.latent_factor) ** 2)


def pretrain_tiny(out: str | Path, settings: PretrainSettings | None = None, log=print) -> Path | None:
    """Run (or continue) both stages into ``out``; returns the diffusers folder ``out/final`` when done,
    None when the time limit paused it (run again with the same ``out`` to continue)."""
    from tuner.models.base import BaseModel, export_base
    from tuner.models.families import TINY
    from tuner.models.tiny import build_tokenizer, scheduler_config

    s = resolved(settings or PretrainSettings())
    out = Path(out)
    final = out / "final"
    shard = local_shard()
    for name, batch in (("vae_batch", s.vae_batch), ("batch", s.batch), ("decoder_batch", s.decoder_batch)):
        if batch % shard.world:
            raise ValueError(f"{name} = {batch} does not split over {shard.world} processes: use a multiple of "
                             f"{shard.world}")
    _check_same_architecture(out, s)
    if not shard.is_main:
        log = _quiet
    out.mkdir(parents=True, exist_ok=True)
    if shard.is_main:
        write_text_atomic(out / "settings.json", json.dumps(asdict(s), indent=2))
        if final.exists():  # a finished run continued to more steps: its old result must not be taken as new
            shutil.rmtree(final)
    clock = _Clock(s.time_limit_min)
    started = time.perf_counter()
    scenes = pretrain_scenes()
    if s.scene_limit:
        scenes = scenes[:: max(1, len(scenes) // s.scene_limit)][: s.scene_limit]
    log(f"pretraining on {len(scenes)} distinct scenes of the world's pretraining split"
        + (f", {shard.world} processes" if shard.world > 1 else ""))

    def paused() -> None:
        if shard.is_main:
            add_wall_minutes(out, (time.perf_counter() - started) / 60)

    vae = train_vae(out, s, scenes, clock, log, shard)
    if vae is None:
        return paused()
    vae.requires_grad_(False).eval()
    result = train_denoiser(out, s, scenes, vae, clock, log, shard)
    if result is None:
        return paused()
    unet, te, history = result
    if s.decoder_steps > 0:
        vae = finetune_decoder(out, s, scenes, vae, clock, log, shard)
        if vae is None:
            return paused()
    if not shard.is_main:
        return final  # the main process writes it
    base = BaseModel(family=TINY, unet=unet, vae=vae, text_encoder=te, tokenizer=build_tokenizer(),
                     scheduler_config=scheduler_config(s.snr_shift), source=str(final))
    export_base(base, final)
    write_text_atomic(out / "history.json", json.dumps(history))
    part = (time.perf_counter() - started) / 60
    total = add_wall_minutes(out, part)
    log(f"pretraining finished (this part: {part:.1f} min, all parts: {total:.1f} min); wrote {final}")
    return final


WALL_FILE = "wall_minutes.json"


def _quiet(*_args) -> None:
    """The log of processes other than the main one."""


def add_wall_minutes(out: Path, minutes: float) -> float:
    """Add one part's wall time to ``out/wall_minutes.json`` (a run in parts reports its total); returns it."""
    path = out / WALL_FILE
    parts = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    parts.append(round(minutes, 2))
    write_text_atomic(path, json.dumps(parts))
    return float(sum(parts))


def wall_minutes(out: Path) -> float | None:
    path = Path(out) / WALL_FILE
    return float(sum(json.loads(path.read_text(encoding="utf-8")))) if path.exists() else None
