"""The training loop, shared by every method. Reads top to bottom: batch, loss, backward (accumulated),
clip, step, log, preview, checkpoint; export at the end."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuner.adapters.lora import trainable_state
from tuner.config.load import recipe_to_dict
from tuner.errors import TunerError
from tuner.models.prompts import unet_kwargs
from tuner.optim.memory import adapter_input_casts_off
from tuner.train.batches import batch_at, latents_for, prompt_embeds_for
from tuner.train.caches import cache_latents, cache_prompts
from tuner.train.checkpoint import CheckpointState, save_checkpoint
from tuner.train.distributed import gather_optimizer_state, step_totals, sync_gradients
from tuner.train.export import export_adapter, write_preview
from tuner.train.objective import add_noise, diffusion_loss, target_for
from tuner.train.run_report import RunReport
from tuner.train.setup import Run
from tuner.train.tracking import NullTracker, Tracker, open_tracker


@dataclass
class TrainResult:
    outputs: list[Path]
    final_loss: float
    seconds: float
    steps: int
    report: Path | None = None


def step_seed(seed: int, step: int) -> int:
    """Seed of every random draw in optimizer step ``step`` (noise, timesteps, VAE sampling, dropout)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def compute_loss(run: Run, micro_step: int, generator: torch.Generator) -> torch.Tensor:
    """Mean diffusion loss of one micro-batch (scalar, fp32). With prior preservation the micro-batch also
    holds as many class images, and their mean loss is added with weight ``prior.loss_weight``. With several
    processes: this process's part of global micro-batch ``micro_step`` (``tuner.train.distributed``)."""
    cfg, base, shard = run.recipe.train, run.base, run.shard
    parts = [(run.dataset, run.latent_cache)]
    if run.class_dataset is not None:
        parts.append((run.class_dataset, run.class_latent_cache))
    latents, captions, sizes, crops = [], [], [], []
    for dataset, cache in parts:
        batch = batch_at(dataset, shard.micro_batch(micro_step), cfg.batch_size)
        latents.append(latents_for(
            batch, vae=base.vae, latent_scale=base.latent_scale, generator=generator, cache=cache, device=run.device,
            shard=shard,
        ))
        captions += batch.captions
        sizes += batch.original_sizes  # SDXL's size/crop conditioning (unet_kwargs)
        crops += batch.crop_top_left
    latents_all = torch.cat(latents)
    noisy, noise, timesteps = add_noise(latents_all, run.noise_scheduler, generator, noise_offset=cfg.noise_offset,
                                        shard=shard, parts=[len(part) for part in latents])
    target = target_for(base.prediction_type, latents_all, noise, timesteps, run.noise_scheduler)
    cond = prompt_embeds_for(captions, base=base, cache=run.prompt_cache)
    target_size = (noisy.shape[-2] * base.vae_scale_factor, noisy.shape[-1] * base.vae_scale_factor)
    inputs = unet_kwargs(base.family, cond, target_size=target_size, original_sizes=sizes, crops=crops)
    with run.accelerator.autocast():
        pred = base.unet(noisy, timesteps, **inputs).sample
    loss = diffusion_loss(
        pred, target, timesteps, run.noise_scheduler,
        prediction_type=base.prediction_type, min_snr_gamma=cfg.min_snr_gamma,
    )
    n = len(latents[0])  # the instance rows (a bucket's last batch may be smaller than batch_size)
    if run.class_dataset is None:
        return loss.mean()
    return loss[:n].mean() + run.recipe.prior.loss_weight * loss[n:].mean()


def prepare_caches(run: Run, log=print) -> None:
    """Cache latents (frozen VAE) and prompt embeds (frozen text encoder) when the recipe asks for it; the
    cached components leave the training device (``tuner.train.caches``)."""
    cfg = run.recipe.train
    if cfg.cache_latents:
        cache_latents(run, log)
    if cfg.cache_prompts and run.text_encoder_frozen:
        cache_prompts(run, log)


def _silent(*_args, **_kwargs) -> None:
    """The log of the processes other than the main one."""


class _NoReport:
    """The other processes' stand-in for the main process's :class:`RunReport` (which alone writes the page)."""

    def write(self, step: int, status: str | None = None) -> None:
        return None


def save(run: Run, step: int) -> Path:
    """Every process calls this at a checkpoint: a sharded optimizer's states are gathered on the main process
    first, which alone writes ``<output>/checkpoints/step_XXXXXX``; returns that folder's path."""
    gather_optimizer_state(run.optimizer, run.shard.world)
    if not run.shard.is_main:
        return run.out_dir / "checkpoints" / f"step_{step:06d}"
    state = CheckpointState(
        step=step,
        trainable={**trainable_state(run.trained), **(run.ema.state() if run.ema else {})},
        optimizer=run.optimizer.state_dict(),
        lr_scheduler=run.lr_scheduler.state_dict(),
        history=run.history,
        recipe_toml=run.recipe_toml,
    )
    return save_checkpoint(run.out_dir / "checkpoints", state, keep=run.recipe.train.keep_checkpoints)


def averaged(run: Run):
    """The EMA weights in place when EMA is on (previews and export use them), else a no-op."""
    return run.ema.applied() if run.ema is not None else contextlib.nullcontext()


class TrainingStopped(TunerError):
    """Training ended before its last step: by a signal (checkpoint saved, ``exit_code`` 130) or by the
    numerical guard (too many non-finite steps in a row; nothing saved over the last good checkpoint)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step (a second signal stops at once)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _grad_norm(run: Run) -> float:
    """Total gradient norm, clipped to ``max_grad_norm`` when that is set (an infinite bound is a no-op)."""
    if getattr(run.optimizer, "fused", False):
        return run.optimizer.grad_norm  # measured tensor by tensor in backward (no clipping possible)
    bound = run.recipe.train.max_grad_norm or float("inf")
    if run.grad_shards is not None:  # each process holds its share: the norm needs all of them
        return run.grad_shards.clip(bound)
    return float(run.accelerator.clip_grad_norm_(run.params, bound))


def train(run: Run, log=print) -> TrainResult:
    """Train from ``run.start_step`` to ``recipe.train.steps``; returns the exported files.

    A step whose loss or gradient is NaN/inf changes nothing (no optimizer or EMA update; the schedule and
    the data order move on, so a resumed run stays aligned); ``train.max_bad_steps`` of them in a row stop
    the run. SIGINT/SIGTERM finish the current step, save a checkpoint and raise :class:`TrainingStopped`.

    With several processes (``run.shard``) every process runs this loop on its part of each step's batch;
    gradients, the loss and stop requests are combined once per step, and only the main process logs and
    writes files (the others wait for it at the end).
    """
    cfg, preview, shard = run.recipe.train, run.recipe.preview, run.shard
    if not shard.is_main:
        log = _silent
    log(f"step arithmetic: {run.arithmetic.describe()}")
    prepare_caches(run, log)
    for module in run.trained.values():
        module.train()
    started = time.perf_counter()
    step, bad = run.start_step, 0
    # fp16's gradient scaler skips steps with overflowing gradients itself: only the loss is ours to check
    check_grads = run.recipe.train.mixed_precision != "fp16"
    fused = getattr(run.optimizer, "fused", False)  # optim.fused_backward: steps happen inside backward
    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not shard.is_main)
    # <output.dir>/report.html, rewritten at previews and checkpoints
    report = RunReport(run, log=bar.write) if shard.is_main else _NoReport()
    with _StopRequest() as stop, _tracker(run) as tracker:
        while step < cfg.steps:
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, step))
            # LoRA dropout uses the global generator (one stream per process: its masks are not per sample)
            torch.manual_seed(step_seed(cfg.seed, step) + shard.rank)
            loss_sum = 0.0
            for micro in range(cfg.gradient_accumulation):
                # the forward pass and backward's recomputation (checkpointing) both run under autocast
                with adapter_input_casts_off(run.autocast_adapters):
                    loss = compute_loss(run, step * cfg.gradient_accumulation + micro, generator)
                    loss_sum += loss.item() / cfg.gradient_accumulation
                    if not (fused and not math.isfinite(loss_sum)):  # fused: backward would step the weights
                        run.accelerator.backward(loss / cfg.gradient_accumulation)
                        if run.grad_shards is not None:
                            run.grad_shards.flush()
            loss_sum, stopping = step_totals(loss_sum, stop.signal is not None, shard.world, run.device)
            if stopping and stop.signal is None:
                stop.signal = "a stop request to another process"
            if run.grad_shards is not None:  # mean over the global batch, each process its share
                run.grad_shards.finish()
            else:
                sync_gradients(run.params, shard.world, run.device)  # mean over the global batch
            norm = _grad_norm(run) if (check_grads or cfg.max_grad_norm > 0) else 0.0
            finite = math.isfinite(loss_sum) and (math.isfinite(norm) or not check_grads)
            if finite:
                run.optimizer.step()
                bad = 0
            else:
                bad += 1
                bar.write(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} "
                          f"({loss_sum:.4g}, grad norm {norm:.4g}); step skipped ({bad} in a row)")
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            if finite and run.ema is not None:
                run.ema.update()
            step += 1
            lr = run.lr_scheduler.get_last_lr()[0]
            run.history["loss"].append(loss_sum)
            run.history["lr"].append(lr)
            tracker.scalars(step, {"loss": loss_sum, "lr": lr, "grad_norm": norm})
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if bad >= cfg.max_bad_steps:
                bar.close()
                report.write(step, f"stopped at step {step}: {bad} non-finite steps in a row")
                raise TrainingStopped(_bad_steps_message(run, step, bad))
            if stop.signal is not None:
                bar.close()
                path = save(run, step)
                run.accelerator.wait_for_everyone()
                report.write(step, f"stopped at step {step} by {stop.signal}; resume with --resume latest")
                raise TrainingStopped(
                    f"{stop.signal} at step {step}/{cfg.steps}: checkpoint saved to '{path}'. Continue with the "
                    "same command plus --resume latest.", exit_code=130,
                )
            # with train.shard_frozen every process samples too (each UNet layer gathers its weight from all of
            # them), and only the main one writes
            if preview.every and step % preview.every == 0 and (shard.is_main or run.recipe.train.shard_frozen):
                with averaged(run):
                    path = write_preview(run, step, write=shard.is_main)
                if shard.is_main:
                    tracker.image(step, "preview", path)
                    report.write(step)
            # never during a run of skipped steps: the last good checkpoint stays newest (`bad` is the same on
            # every process, so all of them reach save(), which gathers a sharded optimizer's state)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps and not bad:
                save(run, step)
                report.write(step)
    bar.close()
    if run.grad_shards is not None:
        held = run.grad_shards
        held.close()
        log(f"gradients sharded (optim.shard_gradients): process 0 held at most {held.peak:,} of the "
            f"{held.total:,} gradient elements at once")
    outputs = []
    save(run, step)
    if shard.is_main:
        with averaged(run):
            outputs = export_adapter(run)
    run.accelerator.wait_for_everyone()  # the other processes return once the files are written
    seconds = time.perf_counter() - started
    final = sum(run.history["loss"][-10:]) / max(1, len(run.history["loss"][-10:]))
    page = report.write(step, f"finished: {step} steps")
    return TrainResult(outputs=outputs, final_loss=final, seconds=seconds, steps=step, report=page)


@contextlib.contextmanager
def _tracker(run: Run) -> Iterator[Tracker]:
    """The run's experiment tracker (``train.log_with``), closed (flushed) however training ends; on the main
    process only."""
    if not run.shard.is_main:
        yield NullTracker()
        return
    tracker = open_tracker(run.recipe.train.log_with, run.out_dir, name=run.recipe.output.name,
                           recipe_toml=run.recipe_toml, config=recipe_to_dict(run.recipe))
    try:
        yield tracker
    finally:
        tracker.close()


def _bad_steps_message(run: Run, step: int, bad: int) -> str:
    from tuner.train.checkpoint import list_checkpoints

    found = list_checkpoints(run.out_dir / "checkpoints")
    kept = f"the last good checkpoint is '{found[-1]}'" if found else "no checkpoint was saved before it"
    cfg = run.recipe
    hints = [f"lower optim.learning_rate (now {cfg.optim.learning_rate:g})"]
    if cfg.train.mixed_precision == "fp16":
        hints.insert(0, 'fp16 overflows easily (the SD VAE notably): use train.mixed_precision = "bf16" or "no"')
    if cfg.train.max_grad_norm == 0:
        hints.append("turn gradient clipping back on (train.max_grad_norm = 1.0)")
    return (
        f"training stopped at step {step}: the loss or gradient was NaN/inf for {bad} steps in a row "
        f"(train.max_bad_steps = {cfg.train.max_bad_steps}); those steps changed nothing, and {kept}. "
        "Try: " + "; ".join(hints) + "."
    )


def restore(run: Run, checkpoint: Path, log=print) -> None:
    """Load a checkpoint into ``run``: trainable tensors, optimizer and LR-schedule state, step, history.

    Refuses a checkpoint made by a recipe whose model, data or adapter settings differ (they would not fit
    or would silently train something else); schedule length, previews and checkpoint cadence may change.
    """
    import tomllib

    from tuner.config.load import recipe_to_toml
    from tuner.config.schema import Recipe
    from tuner.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    if state.recipe_toml:
        saved = tomllib.loads(state.recipe_toml)
        current = tomllib.loads(run.recipe_toml)
        # keys added to the schema after a checkpoint was made count as their defaults
        defaults = tomllib.loads(recipe_to_toml(Recipe()))
        differ = [
            f"{table}.{key}: checkpoint {saved[table].get(key)!r}, now {value!r}"
            for table in ("model", "adapter", "embedding", "prior", "data")
            if table in saved  # tables added after a checkpoint was made are not compared
            for key, value in current[table].items()
            if saved[table].get(key, defaults[table].get(key)) != value
            and key not in ("strict", "path", "vae_dtype")
        ]
        if differ:
            raise TunerError(
                f"checkpoint '{checkpoint}' was made with different settings:\n  " + "\n  ".join(differ)
                + "\nResume with the same recipe, or start a new run in another output folder."
            )
    params = {
        f"{c}.{n}": p for c, m in run.trained.items() for n, p in m.named_parameters() if p.requires_grad
    }
    missing = sorted(set(params) - set(state.trainable))
    if missing:
        raise TunerError(f"checkpoint '{checkpoint}' lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.trainable[name].to(p.dtype))
    if run.ema is not None:
        try:
            run.ema.load(state.trainable)
        except KeyError as exc:
            raise TunerError(f"checkpoint '{checkpoint}' has no EMA weights ({exc}); it was saved with "
                             "train.ema_decay = 0. Resume with train.ema_decay = 0 or start a new run.") from None
    run.optimizer.load_state_dict(state.optimizer)
    run.lr_scheduler.load_state_dict(state.lr_scheduler)
    run.start_step = state.step
    run.history = {k: list(v) for k, v in state.history.items()} or run.history
    log(f"resumed from {checkpoint} at step {state.step}")
