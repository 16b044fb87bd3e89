"""All wiring for a training run in one place: recipe -> base, adapter, data, optimizer -> :class:`Run`.

The loop (``tuner.train.loop``) only reads the run; nothing here trains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.config.load import recipe_hash, recipe_to_toml
from tuner.config.schema import Recipe
from tuner.data.buckets import BucketPlan, plan_buckets
from tuner.data.dataset import TrainDataset
from tuner.data.folder import DatasetIndex, scan_dataset
from tuner.errors import TunerError
from tuner.formats.io import writable_folder_problem
from tuner.models.base import BaseModel, load_base
from tuner.optim.fused import FusedBackward
from tuner.optim.memory import (
    STORAGE,
    adapter_layers,
    cast_frozen,
    frozen_dtype,
    return_freed_memory,
    set_attention,
    store_frozen,
    to_channels_last,
)
from tuner.optim.optimizers import build_optimizer, build_schedule
from tuner.train.distributed import (
    Shard,
    ShardedGradients,
    broadcast_parameters,
    check_launch,
    owners,
)
from tuner.train.ema import Ema
from tuner.train.methods import METHODS, AdapterSettings, Method
from tuner.train.tracking import missing_package


@dataclass(frozen=True)
class StepArithmetic:
    images: int
    samples_per_epoch: int
    batch_size: int
    accumulation: int
    steps: int
    batches_per_epoch: int = 0
    """With aspect-ratio buckets: micro-batches per epoch (a bucket's last batch may be smaller); 0 = none."""
    processes: int = 1
    """Data-parallel processes, each training ``batch_size`` samples per micro-batch."""

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.processes

    @property
    def steps_per_epoch(self) -> float:
        if self.batches_per_epoch:
            return self.batches_per_epoch / (self.accumulation * self.processes)
        return self.samples_per_epoch / self.samples_per_step

    @property
    def epochs(self) -> float:
        if self.batches_per_epoch:
            return self.steps * self.accumulation * self.processes / self.batches_per_epoch
        return self.steps * self.samples_per_step / self.samples_per_epoch

    def describe(self) -> str:
        return (
            f"{self.images} images -> {self.samples_per_epoch} samples per epoch (with repeats); "
            f"batch {self.batch_size} x accumulation {self.accumulation}"
            + (f" x {self.processes} processes" if self.processes > 1 else "")
            + f" = {self.samples_per_step} samples "
            f"per step -> {self.steps_per_epoch:.2f} steps per epoch"
            + (f" ({self.batches_per_epoch} one-bucket batches)" if self.batches_per_epoch else "")
            + f"; {self.steps} steps = {self.epochs:.2f} epochs"
        )


@dataclass
class Run:
    """Everything the loop needs. ``trained``: component name -> module with trainable parameters."""

    recipe: Recipe
    recipe_path: str | None
    base: BaseModel
    method: Method
    adapter: AdapterSettings
    trained: dict[str, nn.Module]
    index: DatasetIndex
    dataset: TrainDataset
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    noise_scheduler: Any
    accelerator: Any
    device: torch.device
    out_dir: Path
    arithmetic: StepArithmetic
    start_step: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "lr": []})
    latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
    prompt_cache: dict[str, Any] | None = None
    class_dataset: TrainDataset | None = None
    """Prior preservation: the class images, paired batch for batch with the instance images."""
    class_latent_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
    ema: Ema | None = None
    offloaded: list[str] = field(default_factory=list)
    """Frozen components moved off the training device after caching (``vae``, ``text_encoder``)."""
    shard: Shard = Shard()
    """This process's place in data-parallel training (``tuner.train.distributed``); one process by default."""
    grad_shards: ShardedGradients | None = None
    """``optim.shard_gradients`` with several processes: the gradient reduction (ZeRO stage 2)."""
    autocast_adapters: list[nn.Module] = field(default_factory=list)
    """The UNet's peft adapter layers when autocast runs: their input casts are skipped inside it
    (``tuner.optim.memory.adapter_input_casts_off``)."""

    @property
    def text_encoder_frozen(self) -> bool:
        """True when nothing trained changes what the text encoder outputs (prompt embeds can be cached)."""
        return not any(c.startswith(("text_encoder", "embedding")) for c in self.trained)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def recipe_toml(self) -> str:
        return recipe_to_toml(self.recipe)

    @property
    def recipe_hash(self) -> str:
        return recipe_hash(self.recipe)


def pick_device(spec: str) -> torch.device:
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError as exc:
            raise TunerError(f"train.device = {spec!r} is not a device (use auto, cpu, cuda, cuda:1, mps)") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TunerError(f"train.device = {spec!r} but no CUDA device is available; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_accelerator(mixed_precision: str, *, cpu: bool):
    """An ``accelerate.Accelerator`` for this run. accelerate keeps one process-wide state and refuses a
    second run with another precision in the same process (a notebook, the tests); a single-process
    state is reset for the new run instead.

    Its autocast keeps no cache of weight casts: with the cache, the half-precision copy of
    every fp32 trainable weight stays alive until the forward pass ends, one more copy of the model for a full
    fine-tune (SD1.5: 1.6 GiB, measured on an H100 with ``bench/gpu.py --features``). Without it a cast lives
    as long as its operation needs it: under gradient checkpointing, not past its block. Each weight is used
    once per forward pass, so the cache saved no cast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType
    from accelerate.utils import AutocastKwargs

    if AcceleratorState._shared_state and AcceleratorState().distributed_type == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       kwargs_handlers=[AutocastKwargs(cache_enabled=False)])


def _silent(*_args, **_kwargs) -> None:
    """The log of the processes other than the main one."""


def adapter_settings(recipe: Recipe) -> AdapterSettings:
    a = recipe.adapter
    return AdapterSettings(
        targets=a.targets,
        rank=a.rank,
        alpha=a.alpha,
        conv_rank=a.conv_rank,
        conv_alpha=a.conv_alpha,
        dropout=a.dropout,
        train_text_encoder=a.train_text_encoder,
        text_encoder_rank=a.text_encoder_rank,
        text_encoder_alpha=a.text_encoder_alpha,
        tokens=tuple(recipe.embedding.tokens),
        init_words=tuple(recipe.embedding.init_words),
        vectors=recipe.embedding.vectors,
    )


def check_tokens_in_captions(index: DatasetIndex, tokens: list[str], data_path: str) -> None:
    """A new token that no caption uses would never receive a gradient: refuse before loading anything."""
    captions = [item.caption for item in index.items]
    unused = [t for t in tokens if not any(t in c for c in captions)]
    if unused:
        example = captions[0] if captions else ""
        raise TunerError(
            f"embedding.tokens {unused} appear in none of the {len(captions)} captions of '{data_path}' "
            f"(e.g. {example!r}), so they would never train: put the token in the captions (e.g. "
            f"'a {unused[0]} circle'), or set data.instance_prompt for images without captions"
        )


def output_folder_problems(recipe: Recipe) -> list[str]:
    """Folders the run will write into that cannot be written (each message names the key and the fix)."""
    problems = []
    why = writable_folder_problem(recipe.output.dir)
    if why:
        problems.append(f"output.dir = '{recipe.output.dir}' cannot be written: {why}. Pick a writable folder "
                        "(--output DIR or output.dir in the recipe)")
    if recipe.prior.enabled and recipe.prior.class_dir:
        why = writable_folder_problem(recipe.prior.class_dir)
        if why:
            problems.append(f"prior.class_dir = '{recipe.prior.class_dir}' cannot be written: {why}. Pick a "
                            "writable folder, or leave prior.class_dir empty to use <output.dir>/class_images")
    return problems


def check_output_folders(recipe: Recipe) -> None:
    """Refuse to start (before any model loads) when an output folder cannot be written."""
    problems = output_folder_problems(recipe)
    if problems:
        raise TunerError("; ".join(problems))


def class_image_dir(recipe: Recipe) -> Path:
    return Path(recipe.prior.class_dir) if recipe.prior.class_dir else Path(recipe.output.dir) / "class_images"


def build_class_dataset(recipe: Recipe, base: BaseModel, resolution: int, device: torch.device, log=print,
                        instance: TrainDataset | None = None) -> TrainDataset:
    """Prior preservation: fill the class-image cache with the untouched base, then index it. With
    aspect-ratio buckets (``instance.buckets``) the class images fill the instance buckets (each its share of
    ``prior.num_images``, drawn at its size when missing) and every class batch follows the instance batch of
    the same step into its bucket (``TrainDataset`` ``partner``), so both stack into one UNet batch."""
    from tuner.data.buckets import bucket_quotas, plan_in_buckets
    from tuner.sample.sampler import SampleSettings
    from tuner.train.prior import ensure_class_images

    p = recipe.prior
    plan, quotas = None, None
    if instance is not None and instance.buckets is not None:
        plan = instance.buckets
        samples = [plan.bucket_of(instance.item_of(i)) for i in range(len(instance))]
        quotas = bucket_quotas({b: samples.count(b) for b in plan.buckets}, p.num_images)
    base.to(device)
    folder = ensure_class_images(
        base, class_image_dir(recipe), prompts=p.class_prompts, count=p.num_images,
        # drawn at the training resolution (buckets: at each bucket's size), not the base's native size: an
        # SDXL job at 512 px would otherwise draw 1024 px images only to scale them down
        settings=SampleSettings(steps=p.steps, cfg=p.cfg, sampler=p.sampler, width=resolution, height=resolution,
                                batch_size=p.batch_size),
        seed=p.seed, log=log, quotas=quotas,
    )
    index = scan_dataset(folder, strict=recipe.data.strict)
    for path, reason in index.skipped:
        log(f"skipped class image {path}: {reason}")
    class_plan = plan_in_buckets([item.size for item in index.items], plan) if plan is not None else None
    return TrainDataset(index, resolution=resolution, center_crop=True, flip=recipe.data.flip, seed=recipe.train.seed + 1,
                        background=background(recipe), buckets=class_plan,
                        partner=instance if class_plan is not None else None)


def bucket_plan(recipe: Recipe, index: DatasetIndex, resolution: int, family_step: int) -> BucketPlan | None:
    """The aspect-ratio buckets of ``index`` when ``data.bucketing`` is on (``family_step``: the family's
    ``bucket_step``, used when ``data.bucket_step`` is 0); None when off. Raises :class:`TunerError` for bucket
    sizes that do not fit the resolution or the step."""
    d = recipe.data
    if not d.bucketing:
        return None
    return plan_buckets([item.size for item in index.items], resolution=resolution, step=d.bucket_step or family_step,
                        min_size=d.min_bucket_reso, max_size=d.max_bucket_reso, no_upscale=d.bucket_no_upscale)


def background(recipe: Recipe) -> tuple[int, int, int]:
    """``data.alpha_background`` as the RGB triple the data layer takes."""
    r, g, b = recipe.data.alpha_background
    return (r, g, b)


def apply_memory_settings(
    recipe: Recipe, base: BaseModel, *, autocast_active: bool, shard: Shard = Shard(), log=print
) -> None:
    """Attention kernel, storage dtype of frozen weights (VAE: ``model.vae_dtype``), channels_last; called
    after the adapter is attached (so trained tensors are known: they stay fp32) and before the move to the
    device (so the device never holds the fp32 copies)."""
    t = recipe.train
    for module in (base.unet, base.vae):
        set_attention(module, t.attention)
    dtype = frozen_dtype(t.mixed_precision, t.weight_dtype, autocast_active=autocast_active)
    if t.mixed_precision != "no" and dtype == torch.float32 and t.weight_dtype == "auto":
        log(f"NOTE: train.mixed_precision = {t.mixed_precision!r} runs no autocast on this device: "
            "frozen weights stay fp32")
    narrow = t.weight_dtype in STORAGE and STORAGE[t.weight_dtype] != dtype
    split = t.shard_frozen and shard.world > 1
    if t.shard_frozen and not split:
        log("NOTE: train.shard_frozen has no effect with one process: nothing to share the weights with")
    changed = 0
    for module in (base.unet, *base.text_encoders.values()):
        changed += cast_frozen(module, dtype)
        parts = {"rank": shard.rank, "world": shard.world} if split and module is base.unet else {}
        if narrow or parts:
            changed += store_frozen(module, STORAGE[t.weight_dtype] if narrow else dtype, **parts)
    if split:
        split_layers = [m for m in base.unet.modules() if getattr(m, "weight_shard", None) is not None]
        kept = sum(m.weight.numel() for m in split_layers)
        whole = sum(m.weight_shard.numel for m in split_layers)
        log(f"frozen UNet weights sharded over {shard.world} processes (train.shard_frozen): process 0 keeps "
            f"{kept:,} of their {whole:,} values")
    changed += cast_frozen(base.vae, torch.float32 if recipe.model.vae_dtype == "fp32" else dtype)
    if changed:
        return_freed_memory()  # the wide copies, freed, leave the process (on a CPU they would stay resident)
    if t.channels_last:
        to_channels_last(base.unet)


def setup_run(recipe: Recipe, *, recipe_path: str | None = None, base: BaseModel | None = None, log=print) -> Run:
    """Load the base, attach the adapter, index the data, build optimizer and schedules.

    ``base``: an already loaded base model to use instead of ``recipe.model.base`` (tests, notebooks).
    Fails fast (before loading any model) on a missing data folder or base path.
    """
    from diffusers import DDPMScheduler

    if not recipe.data.path:
        raise TunerError("no training data: set data.path in the recipe or pass --data FOLDER")
    check_output_folders(recipe)
    problem = missing_package(recipe.train.log_with)
    if problem:
        raise TunerError(problem)
    device = pick_device(recipe.train.device)
    accelerator = make_accelerator(recipe.train.mixed_precision, cpu=device.type == "cpu")
    shard = Shard(accelerator.process_index, accelerator.num_processes)
    check_launch(accelerator.distributed_type.value, world=shard.world, device_spec=recipe.train.device,
                 fused_backward=recipe.optim.fused_backward)
    if shard.world > 1:
        if device.type != "cpu":
            device = accelerator.device  # one device per process (cuda:<local rank>)
        log = log if shard.is_main else _silent
    index = scan_dataset(
        recipe.data.path,
        instance_prompt=recipe.data.instance_prompt,
        default_repeats=recipe.data.repeats,
        strict=recipe.data.strict,
    )
    for path, reason in index.skipped:
        log(f"skipped {path}: {reason}")
    if recipe.adapter.method in ("textual_inversion", "pivotal"):
        check_tokens_in_captions(index, recipe.embedding.tokens, recipe.data.path)
    base = base or load_base(recipe.model.base, prediction_type=recipe.model.prediction)
    for note in base.notes:
        log(f"NOTE: {note}")
    resolution = recipe.data.resolution or base.family.resolution
    if resolution % base.vae_scale_factor:
        raise TunerError(
            f"data.resolution = {resolution} must be a multiple of {base.vae_scale_factor} for this base"
        )
    buckets = bucket_plan(recipe, index, resolution, base.family.bucket_step)
    log(index.summary(0 if buckets else resolution))  # with buckets, upscaling is counted per bucket
    if buckets is not None:
        log(buckets.summary())
    dataset = TrainDataset(
        index,
        resolution=resolution,
        center_crop=recipe.data.center_crop,
        flip=recipe.data.flip,
        caption_dropout=recipe.data.caption_dropout,
        shuffle_tags=recipe.data.shuffle_tags,
        keep_tags=recipe.data.keep_tags,
        seed=recipe.train.seed,
        background=background(recipe),
        buckets=buckets,
    )
    class_dataset = None
    if recipe.prior.enabled:
        with accelerator.main_process_first():  # the main process draws the class images; the others reuse them
            class_dataset = build_class_dataset(recipe, base, resolution, device, log, dataset)
    method = METHODS[recipe.adapter.method]
    settings = adapter_settings(recipe)
    torch.manual_seed(recipe.train.seed)  # adapter init (kaiming) is reproducible
    trained = method.attach(base, settings)
    if recipe.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for component, encoder in base.text_encoders.items():
            if component in trained:
                encoder.gradient_checkpointing_enable()
    apply_memory_settings(recipe, base, autocast_active=accelerator.native_amp, shard=shard, log=log)
    base.to(device)
    opt = recipe.optim
    groups = []
    # pivotal with train_text_encoder: the placeholder rows sit inside a trained text encoder too; they belong
    # to their embedding group (its learning rate) only
    rows = {id(p) for c, m in trained.items() if c.startswith("embedding") for p in m.parameters()}
    for component, module in trained.items():
        is_rows = component.startswith("embedding")
        params = [p for p in module.parameters() if p.requires_grad and (is_rows or id(p) not in rows)]
        lr = opt.text_encoder_lr if component.startswith("text_encoder") and opt.text_encoder_lr else opt.learning_rate
        if is_rows:
            lr = recipe.embedding.learning_rate
        groups.append({"params": params, "lr": lr, "name": component})
    wanted = opt.shard_states or opt.shard_gradients  # ZeRO-2 shards the states too
    sharded = wanted and shard.world > 1  # (fused_backward with several processes is refused above)
    if wanted and not sharded:
        key = "shard_gradients" if opt.shard_gradients else "shard_states"
        log(f"NOTE: optim.{key} has no effect with one process: nothing to share the states with")
    make = functools.partial(build_optimizer, opt.optimizer, betas=opt.betas, eps=opt.eps,
                             weight_decay=opt.weight_decay, sharded=sharded)
    # fused: per-tensor steps inside backward (tuner.optim.fused); never wrapped by accelerate, whose
    # optimizer wrapper would step (and unscale) all tensors at once
    optimizer = FusedBackward(groups, make) if opt.fused_backward else make(groups)
    if sharded:
        mine = sum(p.numel() for g in optimizer.optim.param_groups for p in g["params"])
        total = sum(p.numel() for g in groups for p in g["params"])
        stage = "optim.shard_gradients, ZeRO stage 2: states and gradients" if opt.shard_gradients else (
            "optim.shard_states, ZeRO stage 1")
        log(f"optimizer states sharded over {shard.world} processes ({stage}): process 0 "
            f"keeps those of {mine:,} of the {total:,} trained weights")
    grad_shards = None
    if sharded and opt.shard_gradients:
        params = [p for g in groups for p in g["params"]]
        owned = {id(p) for g in optimizer.optim.param_groups for p in g["params"]}  # this process's share
        grad_shards = ShardedGradients(params, owners(params, owned, shard, device), shard.rank, shard.world,
                                       list(trained.values()))
    lr_scheduler = build_schedule(
        optimizer, opt.schedule, warmup_steps=opt.warmup_steps, total_steps=recipe.train.steps
    )
    for component in list(trained):
        # several processes: no DDP wrapper (the loop calls the base's modules directly; the gradients are
        # averaged by tuner.train.distributed.sync_gradients), only accelerate's placement and autocast
        module = trained[component]
        trained[component] = (accelerator.prepare(module) if shard.world == 1
                              else accelerator.prepare_model(module, evaluation_mode=True))
    broadcast_parameters([p for group in groups for p in group["params"]], shard.world)
    if not opt.fused_backward:
        # without device placement for a sharded optimizer: accelerate's would read state_dict() on every process,
        # which a sharded one has only once gathered (its states are still empty, and are made on their device)
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False if sharded else None)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    arithmetic = StepArithmetic(
        images=index.num_images,
        samples_per_epoch=index.samples_per_epoch,
        batch_size=recipe.train.batch_size,
        accumulation=recipe.train.gradient_accumulation,
        steps=recipe.train.steps,
        batches_per_epoch=dataset.batches_per_epoch(recipe.train.batch_size) if buckets else 0,
        processes=shard.world,
    )
    if arithmetic.samples_per_epoch < 1 or not math.isfinite(arithmetic.epochs):
        raise TunerError("the dataset has no samples")
    ema = None
    if recipe.train.ema_decay > 0:
        named = {f"{c}.{n}": p for c, m in trained.items() for n, p in m.named_parameters() if p.requires_grad}
        ema = Ema(named, recipe.train.ema_decay, device="cpu" if recipe.train.ema_on_cpu else None)
    return Run(
        recipe=recipe,
        recipe_path=recipe_path,
        base=base,
        method=method,
        adapter=settings,
        trained=trained,
        index=index,
        dataset=dataset,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        noise_scheduler=noise_scheduler,
        accelerator=accelerator,
        device=device,
        out_dir=Path(recipe.output.dir),
        arithmetic=arithmetic,
        class_dataset=class_dataset,
        ema=ema,
        shard=shard,
        grad_shards=grad_shards,
        autocast_adapters=adapter_layers(base.unet) if accelerator.native_amp else [],
    )
