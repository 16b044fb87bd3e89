"""Peak accelerator memory of a recipe, by component, with step FLOPs and a time range; and the cheapest
settings that fit a given amount of memory.

Model of the peak (all in bytes, on the training device):

- frozen weights: every resident weight not trained, at 2 bytes with ``mixed_precision`` fp16/bf16 (tuner
  stores frozen weights in the autocast dtype unless ``train.weight_dtype = "fp32"``; the VAE at 4 with
  ``model.vae_dtype = "fp32"``), else 4; the VAE counts only without ``cache_latents`` and the text
  encoder(s) only when prompt embeds cannot be cached (text encoder trained, ``cache_prompts`` off or
  ``shuffle_tags``): cached components leave the device before training.
- trainable weights, gradients: 4 bytes each (fp32 master weights under autocast too); with
  ``optim.fused_backward`` only the largest tensor's gradient counts (each is freed right after its step).
- optimizer states: AdamW 8 bytes/param; AdamW8bit 2 bytes/param plus an fp32 absmax per 256-value block
  and state, tensors under 4096 values at 8 bytes (bitsandbytes' rule); Adafactor one factored second
  moment (rows + columns) per matrix.
- EMA: one fp32 copy of the trained tensors unless ``ema_on_cpu``.
- activations: :mod:`tuner.plan.activations`; prior preservation doubles the batch.
- workspace: the transient peak on top (gradient buffers, the recomputed block with checkpointing, or a
  VAE encode without cached latents, whichever is larger).

All of them are taken as live at once, which is an upper bound: in backward, activations are freed while
gradients appear. The CUDA context and allocator slack are a separate line used only when fitting ``--vram``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tuner.config.schema import Recipe
from tuner.errors import TunerError
from tuner.optim.memory import STORAGE
from tuner.plan.activations import (
    GRADIENT_BUFFERS,
    backward_peak,
    estimate_unet,
    text_encoder_activation_bytes,
    text_encoder_flops,
    vae_encode_flops,
    vae_encode_workspace,
)
from tuner.plan.skeleton import (
    Skeleton,
    build_skeleton,
    largest_narrow_weight,
    lora_tensor_sizes,
    narrow_weights,
    param_count,
)
from tuner.train.distributed import GRADIENT_BUCKET, shard_bucket

MB = 1024**2
GB = 1024**3
CUDA_OVERHEAD_BYTES = 600 * MB
"""CUDA context, cuBLAS/cuDNN handles and workspaces: outside PyTorch's allocator, typically 0.4-0.8 GB."""
ALLOCATOR_SLACK = 0.08
"""Fraction of the tensor peak lost to the caching allocator's fragmentation."""

# Reference devices: (name, memory GB, dense peak TFLOPS fp32 without tensor cores, bf16/fp16 tensor cores
# with fp32 accumulation). Public spec-sheet figures.
DEVICES = (
    ("RTX 3060 12GB", 12, 12.7, 25.4),
    ("RTX 4090 24GB", 24, 82.6, 165.2),
    ("A100 40GB", 40, 19.5, 312.0),
    ("H100 SXM 80GB", 80, 67.0, 989.0),
)
UTILISATION = (0.25, 0.5)
"""Fraction of peak FLOPS the step's matrix work reaches (small batches and convs: rarely above half)."""
HOST_SECONDS_PER_LAYER_CALL = (120e-6, 210e-6)
"""Time per UNet layer call (a Linear, conv or norm in one pass) that no card removes: Python, kernel
launches, the small memory-bound kernels. Fitted on an H100 (bench/gpu.py, 2026-11-28: SD1.5 512 px and
SDXL 1024 px LoRA, batch 1, bf16, with and without checkpointing: 127-208 us), where the GPU was busy for
at most a third of the step (0.08 s of kernel time per 0.26 s SD1.5 step); the same host time is assumed
for every card."""
HOST_SECONDS_PER_TENSOR_STEP = (150e-6, 300e-6)
"""Host time of an optimizer that steps tensor by tensor (Adafactor, or any optimizer under the fused
backward), per trained tensor; AdamW's multi-tensor step is in the layer-call figure. Fitted on the same H100:
a full SD1.5 fine-tune with Adafactor + fused backward took 0.17 s per step more than with AdamW, over 686
tensors (250 us each)."""

PRESET_GB = (8, 12, 16, 24)


@dataclass(frozen=True)
class Settings:
    """The knobs that move memory (what ``--vram`` may change)."""

    resolution: int
    batch_size: int
    gradient_accumulation: int
    mixed_precision: str
    gradient_checkpointing: bool
    optimizer: str
    cache_latents: bool
    cache_prompts: bool = True
    weight_dtype: str = "auto"
    fused_backward: bool = False
    ema_on_cpu: bool = False
    processes: int = 1
    """Data-parallel processes (``tuner train --processes``): each holds the whole model and its own
    ``batch_size``; the figures are per process."""
    shard_states: bool = False
    """``optim.shard_states``: with several processes each keeps only its share of the optimizer states."""
    shard_frozen: bool = False
    """``train.shard_frozen``: with several processes each keeps 1/N of the frozen UNet Linear/Conv2d
    weights and gathers one layer's whole weight at a time."""
    shard_gradients: bool = False
    """``optim.shard_gradients`` (with ``shard_states``): each process also keeps only its share of the
    averaged gradients, sent in buckets during backward."""


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    family: str
    method: str
    settings: Settings
    batch_on_device: int
    components: list[Component]
    trainable_params: int
    frozen_params: int
    step_flops: int
    times: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Predicted peak of tensor memory (what PyTorch's allocator holds at its peak)."""
        return sum(c.bytes for c in self.components)

    @property
    def device_bytes(self) -> int:
        """Tensor peak plus allocator slack and the CUDA context: what must fit on a GPU."""
        return int(self.total_bytes * (1 + ALLOCATOR_SLACK)) + CUDA_OVERHEAD_BYTES

    def component(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family, "method": self.method, "settings": asdict(self.settings),
            "batch_on_device": self.batch_on_device,
            "components_mb": {c.name: round(c.bytes / MB, 1) for c in self.components},
            "notes_by_component": {c.name: c.note for c in self.components if c.note},
            "total_mb": round(self.total_bytes / MB, 1),
            "with_cuda_overhead_mb": round(self.device_bytes / MB, 1),
            "trainable_params": self.trainable_params, "frozen_params": self.frozen_params,
            "step_tflop": round(self.step_flops / 1e12, 3), "times": self.times, "notes": self.notes,
        }  # fmt: skip


def settings_from_recipe(recipe: Recipe, native_resolution: int, processes: int = 1) -> Settings:
    t = recipe.train
    o = recipe.optim
    return Settings(processes=processes, shard_states=o.shard_states or o.shard_gradients,
        shard_gradients=o.shard_gradients, shard_frozen=t.shard_frozen,
        resolution=recipe.data.resolution or native_resolution, batch_size=t.batch_size,
        gradient_accumulation=t.gradient_accumulation, mixed_precision=t.mixed_precision,
        gradient_checkpointing=t.gradient_checkpointing, optimizer=recipe.optim.optimizer,
        cache_latents=t.cache_latents, cache_prompts=t.cache_prompts, weight_dtype=t.weight_dtype,
        fused_backward=recipe.optim.fused_backward, ema_on_cpu=t.ema_on_cpu,
    )  # fmt: skip


def optimizer_state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """State bytes of optimizer ``name`` for parameters of ``shapes``."""
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        if name == "adamw":
            total += 8 * n
        elif name == "adamw8bit":
            total += 2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 8 * n
        elif name == "adafactor":
            total += 4 * (n // shape[-1] + n // shape[-2]) if len(shape) >= 2 else 4 * n  # row + col
        else:
            raise TunerError(f"the planner does not know optimizer {name!r}")
    return total


def optimizer_step_bytes(
    name: str, shapes: dict[str, list[tuple[int, ...]]], *, device: str = "cuda", fused: bool = False
) -> int:
    """Transient bytes of one optimizer step over param groups ``shapes`` (component -> tensor shapes).

    - ``adamw``: on an accelerator PyTorch's default multi-tensor path computes ``sqrt(v)`` for a whole
      param group into new tensors (one fp32 copy of the group); on the CPU it runs tensor by tensor and
      ``exp_avg_sq.sqrt() / bias_correction`` holds two temporaries of one tensor.
    - ``adamw8bit``: bitsandbytes updates blockwise in place on an accelerator; its CPU path dequantises
      both states of one tensor to fp32.
    - ``adafactor``: tensor by tensor, ``grad**2``, the update and its RMS: three of one tensor.

    ``fused``: each tensor is its own group (``optim.fused_backward``)."""
    sizes = [_count([sh]) for v in shapes.values() for sh in v]
    if not sizes:
        return 0
    largest = max(sizes)
    largest_group = largest if fused else max(_count(v) for v in shapes.values())
    if name == "adamw":
        return 4 * (largest_group if device != "cpu" else 2 * largest)
    if name == "adamw8bit":
        return 0 if device != "cpu" else 2 * 4 * largest
    if name == "adafactor":
        return 3 * 4 * largest
    raise TunerError(f"the planner does not know optimizer {name!r}")


def _trainable(sk: Skeleton, recipe: Recipe) -> tuple[dict[str, list[tuple[int, ...]]], set[str]]:
    """component -> shapes of its trained tensors, and the components trained in full (whose frozen
    weights therefore do not count)."""
    from tuner.adapters.lora import plan_ranks, text_encoder_targets, unet_targets

    a, method = recipe.adapter, recipe.adapter.method
    shapes: dict[str, list[tuple[int, ...]]] = {}
    full: set[str] = set()
    if method in ("lora", "pivotal"):
        conv = a.targets == "locon"
        plan = plan_ranks(
            sk.unet,
            unet_targets(sk.unet, a.targets),
            rank=a.rank,
            alpha=a.alpha,
            conv_rank=a.conv_rank if conv else None,
            conv_alpha=a.conv_alpha if conv else None,
        )
        shapes["unet"] = [(n,) for n in lora_tensor_sizes(sk.unet, plan)]
        for te_name, te in sk.text_encoders.items() if a.train_text_encoder else ():  # SDXL: both
            te_plan = plan_ranks(
                te,
                text_encoder_targets(te),
                rank=a.text_encoder_rank or a.rank,
                alpha=a.text_encoder_alpha or a.alpha,
            )
            shapes[te_name] = [(n,) for n in lora_tensor_sizes(te, te_plan)]
    if method == "dreambooth":
        full.add("unet")
        shapes["unet"] = [tuple(p.shape) for p in sk.unet.parameters()]
        for te_name, te in sk.text_encoders.items() if a.train_text_encoder else ():
            full.add(te_name)
            shapes[te_name] = [tuple(p.shape) for p in te.parameters()]
    if method in ("textual_inversion", "pivotal"):
        rows = max(1, len(recipe.embedding.tokens)) * recipe.embedding.vectors
        for i, te in enumerate(sk.text_encoders.values()):  # the new token's rows in every encoder (SDXL: 2)
            shapes["embedding" if i == 0 else f"embedding_{i + 1}"] = [(rows, te.config.hidden_size)]
    return shapes, full


def _state_component(
    s: Settings, shapes: dict[str, list[tuple[int, ...]]], shares: list[int] | None
) -> Component:
    """The optimizer states; ``shares``: each process's bytes when they are sharded."""
    if shares:
        return Component("optimizer states", max(shares), f"{s.optimizer}, sharded over {s.processes} processes "
                         f"(the largest share; at a checkpoint all {sum(shares) / MB:,.1f} MB gather in process "
                         "0's CPU memory)")
    return Component("optimizer states", optimizer_state_bytes(s.optimizer, _flat(shapes)), s.optimizer)


def _flat(shapes: dict[str, list[tuple[int, ...]]]) -> list[tuple[int, ...]]:
    return [sh for v in shapes.values() for sh in v]


def _count(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def unet_trained(recipe: Recipe) -> str:
    """What trains in the UNet, in :meth:`tuner.plan.activations.Saving.for_training`'s words."""
    method = recipe.adapter.method
    return {"dreambooth": "all", "textual_inversion": "none"}.get(method, recipe.adapter.targets)


def plan_for(sk: Skeleton, recipe: Recipe, settings: Settings, *, device: str = "cuda") -> Plan:
    """The memory plan of ``recipe`` with ``settings`` (which override the recipe's own knobs) on a
    ``device`` of type ``cuda`` (any accelerator) or ``cpu`` (they differ only in the optimizer's step:
    PyTorch's AdamW runs its multi-tensor path on accelerators and tensor by tensor on the CPU)."""
    s, t, method = settings, recipe.train, recipe.adapter.method
    if s.resolution % sk.vae_scale_factor:
        raise TunerError(
            f"resolution {s.resolution} must be a multiple of {sk.vae_scale_factor} for this base"
        )
    half = s.mixed_precision in ("fp16", "bf16")
    frozen_b, act_b = (2, 2) if half else (4, 4)
    if s.weight_dtype == "fp32":
        frozen_b = 4
    batch = s.batch_size * (2 if recipe.prior.enabled else 1)
    shapes, full = _trainable(sk, recipe)
    trainable = sum(_count(v) for v in shapes.values())

    te_in_graph = method in ("textual_inversion", "pivotal") or recipe.adapter.train_text_encoder
    te_on_device = te_in_graph or not s.cache_prompts or recipe.data.shuffle_tags
    resident = {"unet": sk.unet}
    if te_on_device:
        resident.update(sk.text_encoders)
    if not s.cache_latents:
        resident["vae"] = sk.vae
    frozen = sum(param_count(m) for name, m in resident.items() if name not in full)
    vae_fp32 = "vae" in resident and recipe.model.vae_dtype == "fp32" and frozen_b == 2
    frozen_bytes = frozen * frozen_b + (2 * param_count(sk.vae) if vae_fp32 else 0)
    narrow_b = STORAGE[s.weight_dtype].itemsize if s.weight_dtype in STORAGE else frozen_b
    if narrow_b < frozen_b:  # train.weight_dtype bf16/fp8: Linear/Conv2d weights of the UNet and text encoders
        for name, m in resident.items():
            if name not in full and name != "vae":
                weights, channels = narrow_weights(m)
                frozen_bytes -= weights * (frozen_b - narrow_b) - (4 * channels if s.weight_dtype == "fp8" else 0)
    gather = 0  # train.shard_frozen: one layer's whole weight, gathered (stored dtype) and widened
    if s.shard_frozen and s.processes > 1 and "unet" in resident and "unet" not in full:
        weights, _ = narrow_weights(resident["unet"])
        frozen_bytes -= weights * min(narrow_b, frozen_b) * (s.processes - 1) // s.processes
        gather = largest_narrow_weight(resident["unet"]) * (min(narrow_b, frozen_b) + frozen_b)
    fused = s.fused_backward
    all_shapes = _flat(shapes)
    largest = max((_count([sh]) for sh in all_shapes), default=0)
    sharded = s.processes > 1 and s.shard_states
    shares = state_shares(s.optimizer, list(shapes.values()), s.processes) if sharded else None
    # ZeRO-2: the gradient elements of the largest share (what one process keeps), else all of them
    own = (max(_count(part) for part in _partition(list(shapes.values()), s.processes))
           if sharded and s.shard_gradients else trainable)
    components = [
        Component(
            "frozen weights",
            frozen_bytes,
            f"{frozen / 1e6:,.1f}M params ({', '.join(n for n in resident if n not in full)}) "
            f"at {frozen_b} bytes" + (" (VAE at 4)" if vae_fp32 else "")
            + (f", Linear/Conv2d weights at {narrow_b}" if narrow_b < frozen_b else "")
            + (f", the UNet's split over {s.processes} processes" if gather else "")
            if frozen
            else "none on the device (cached components moved off it)",
        ),
        Component("trainable weights", trainable * 4, f"{trainable / 1e6:,.2f}M params, fp32"),
        _state_component(s, shapes, shares),
    ]
    if t.ema_decay > 0 and not s.ema_on_cpu:
        components.append(Component("EMA copy", trainable * 4, "fp32, train.ema_on_cpu = false"))

    lat = s.resolution // sk.vae_scale_factor
    unet_act = estimate_unet(
        sk.unet,
        height=lat,
        width=lat,
        context=sk.context_tokens,
        batch=batch,
        act_bytes=act_b,
        checkpointing=s.gradient_checkpointing,
        trained=unet_trained(recipe),
    )
    te_act = (
        sum(text_encoder_activation_bytes(te, sk.context_tokens, batch, act_b) for te in sk.text_encoders.values())
        if te_in_graph
        else 0
    )
    unet_full = "unet" in full and not fused
    moment = backward_peak(unet_act, unet_trains=unet_full, before=te_act)
    # gradients alive at the backward peak: the UNet's as the walk found them; everything else trained (LoRA
    # factors, token rows: small) counted whole; a fully trained text encoder's come after the UNet's
    other_grads = (
        trainable
        - (_count(shapes["unet"]) if "unet" in full else 0)
        - sum(_count(shapes[name]) for name in sk.text_encoders if name in full)
    )
    grads_at_peak = largest if fused else moment.gradient_params + other_grads
    bucket = max(min(GRADIENT_BUCKET, trainable), largest) * 4  # tuner.train.distributed's flat copy
    if own < trainable:  # ZeRO-2: the owned sums so far, plus at most one bucket not sent yet
        bucket = max(shard_bucket(trainable), largest) * 4
        grads_at_peak = min(grads_at_peak, own + bucket // 4)
    step_temp = optimizer_step_bytes(s.optimizer, shapes, device=device, fused=fused)
    step_note = f"{s.optimizer} step temporaries on {device}"
    if s.processes > 1:
        if shares:  # each process steps its own share
            step_temp = step_temp * max(shares) // max(1, sum(shares))
        if own == trainable:  # sync_gradients averages bucket by bucket through a flat copy at the step
            step_temp += bucket  # (ZeRO-2 sent its buckets during backward and only divides its share here)
            step_note += f" + a {bucket / MB:,.1f} MB gradient bucket (the average over {s.processes} processes)"
    note = f"UNet at {lat}x{lat} latents, batch {batch}" + (
        ", checkpointed" if s.gradient_checkpointing else ""
    )
    note += " + text encoder" if te_in_graph else ""
    workspace, ws_note = (
        moment.workspace,
        f"{GRADIENT_BUFFERS} gradient buffers"
        + ("; the recomputed block" if s.gradient_checkpointing else ""),
    )
    if gather:
        workspace, ws_note = workspace + gather, ws_note + "; the largest frozen layer's gathered weight"
    if own < trainable:  # ZeRO-2 sends buckets inside backward, each through a flat copy
        workspace, ws_note = workspace + bucket, ws_note + "; a gradient bucket's flat copy"
    if fused:  # each tensor is stepped inside backward: its step's temporaries join the walk's peak
        workspace, ws_note = workspace + step_temp, ws_note + "; one fused per-tensor step"
    if not s.cache_latents:
        vae_ws = vae_encode_workspace(sk.vae, s.resolution, s.resolution, batch, frozen_b)
        if vae_ws - moment.saved > workspace:
            workspace, ws_note = vae_ws - moment.saved, "VAE encode of the batch (latents not cached)"
    backward = [
        Component(
            "gradients",
            grads_at_peak * 4,
            "fp32, fused backward: largest tensor only"
            if fused
            else f"fp32, alive at the peak ({moment.where})"
            + ("; sharded: at most this process's share and one bucket" if own < trainable else ""),
        ),
        Component("activations", moment.saved, note + f"; alive at the peak ({moment.where})"),
        Component("workspace", workspace, ws_note),
    ]
    # the optimizer step: every gradient at once, activations gone, plus the step's own temporaries
    step = [
        Component("gradients", own * 4, "fp32, all of them (the optimizer step)" if own == trainable
                  else f"fp32, this process's share of them (the optimizer step, sharded over {s.processes})"),
        Component("activations", 0, note + "; freed by the optimizer step"),
        Component("workspace", step_temp, step_note),
    ]
    peak = step if not fused and sum(c.bytes for c in step) > sum(c.bytes for c in backward) else backward
    components[2:2] = peak[:1]
    components += peak[1:]

    flops = 3 * unet_act.forward_flops + (unet_act.forward_flops if s.gradient_checkpointing else 0)
    flops += sum(text_encoder_flops(te, sk.context_tokens, batch) for te in sk.text_encoders.values()) * (
        3 if te_in_graph else int(te_on_device)
    )
    if not s.cache_latents:
        flops += vae_encode_flops(sk.vae, s.resolution, s.resolution, batch)
    flops *= s.gradient_accumulation
    plan = Plan(
        family=sk.family.name,
        method=method,
        settings=s,
        batch_on_device=batch,
        components=components,
        trainable_params=trainable,
        frozen_params=frozen,
        step_flops=flops,
        times=_times(flops, half, _host_seconds(sk, s, len(all_shapes))),
    )
    if half and s.weight_dtype == "fp32":
        plan.notes.append(
            "train.weight_dtype = 'fp32' keeps frozen weights in fp32 under autocast (4 bytes); "
            "'auto' stores them in the autocast dtype (2 bytes)"
        )
    return plan


def _steps_tensor_by_tensor(s: Settings) -> bool:
    """Whether the optimizer steps tensor by tensor (a host-time term per trained tensor)."""
    return s.optimizer == "adafactor" or s.fused_backward


def _host_seconds(sk: Skeleton, s: Settings, tensors: int) -> tuple[float, float]:
    """The range of a step's host time: UNet layer calls (each layer once forward, twice backward, once more
    when checkpointing recomputes the forward pass), and an optimizer stepping tensor by tensor."""
    calls = sk.unet_layers * (4 if s.gradient_checkpointing else 3) * s.gradient_accumulation
    per_tensor = tensors if _steps_tensor_by_tensor(s) else 0
    lo, hi = (calls * a + per_tensor * b for a, b in zip(HOST_SECONDS_PER_LAYER_CALL, HOST_SECONDS_PER_TENSOR_STEP))
    return lo, hi


def _times(flops: int, half: bool, host: tuple[float, float]) -> list[dict[str, Any]]:
    """Per reference card: the matrix work at UTILISATION of its peak plus the step's host time."""
    rows = []
    for name, mem_gb, fp32, tensor in DEVICES:
        peak = (tensor if half else fp32) * 1e12
        lo = flops / (peak * UTILISATION[1]) + host[0]
        hi = flops / (peak * UTILISATION[0]) + host[1]
        rows.append(
            {"device": name, "memory_gb": mem_gb, "seconds_min": round(lo, 4), "seconds_max": round(hi, 4)}
        )
    return rows


def plan_recipe(
    recipe: Recipe, *, family: str | None = None, skeleton: Skeleton | None = None, device: str = "cuda",
    processes: int = 1,
) -> Plan:
    """Predict the peak memory of training ``recipe`` (no weight is loaded). ``family``: plan for that
    family's architecture instead of ``recipe.model.base`` (e.g. ``sdxl``); ``device``: see :func:`plan_for`;
    ``processes``: data-parallel processes (the figures are one process's)."""
    sk = skeleton or build_skeleton(recipe.model.base, family, recipe.model.prediction)
    return plan_for(sk, recipe, settings_from_recipe(recipe, sk.family.resolution, processes), device=device)


def state_shares(name: str, groups: list[list[tuple[int, ...]]], processes: int) -> list[int]:
    """Optimizer state bytes each process keeps under ``optim.shard_states``, for the tensor shapes of each
    parameter group."""
    return [optimizer_state_bytes(name, part) for part in _partition(groups, processes)]


def _partition(groups: list[list[tuple[int, ...]]], processes: int) -> list[list[tuple[int, ...]]]:
    """The tensor shapes each process owns under ``optim.shard_states`` (torch's ZeroRedundancyOptimizer:
    group by group, largest tensor first, each to the process holding the fewest values so far, ties to the
    lowest rank)."""
    held: list[int] = [0] * processes
    parts: list[list[tuple[int, ...]]] = [[] for _ in range(processes)]
    for group in groups:
        for shape in sorted(group, key=lambda sh: _count([sh]), reverse=True):
            rank = held.index(min(held))
            parts[rank].append(shape)
            held[rank] += _count([shape])
    return parts


# --- fitting a memory budget ------------------------------------------------------------------------------

# What each change costs in speed or quality (not memory); the search minimises the sum. Free: caching
# (same computation, the components leave the device). Cheap: half-precision storage and autocast, the EMA
# copy on the CPU (a transfer per step), sharding the optimizer states over several processes (a gather at
# each checkpoint), 8-bit AdamW (close to AdamW in practice), fused backward (no
# clipping by the global norm). Dearer: Adafactor (another optimizer), gradient checkpointing (~30% more
# time), a smaller micro-batch (accumulation keeps the effective batch, at lower throughput), and last a
# lower resolution (changes what is learnt).
_COST = {
    "cache_latents": 0,
    "cache_prompts": 0,
    "weight_dtype": 1,
    "fp8_weights": 3,
    "mixed_precision": 1,
    "ema_on_cpu": 1,
    "shard_states": 1,
    "shard_gradients": 2,
    "shard_frozen": 2,
    "adamw8bit": 2,
    "fused_backward": 2,
    "adafactor": 3,
    "gradient_checkpointing": 4,
    "halve_batch": 3,
    "resolution_64": 10,
}


def candidates(
    recipe: Recipe, base: Settings, native: int, optimizers: tuple[str, ...]
) -> list[tuple[int, Settings]]:
    """Every settings variant worth trying, with its cost (0 = the recipe as is). Only changes that keep
    the recipe valid are tried: cached latents need centre crops, cached prompts frozen text encoders and
    no tag shuffling, fused backward a full fine-tune without accumulation or fp16."""
    method = recipe.adapter.method
    batches = sorted({base.batch_size, *(b for b in (1, 2, 4) if b < base.batch_size)}, reverse=True)
    resolutions = [base.resolution] + [
        r for r in range(base.resolution - 64, max(255, native // 2 - 1), -64) if r % 64 == 0 and r >= 256
    ]
    precisions = [base.mixed_precision] if base.mixed_precision != "no" else ["no", "bf16"]
    opts = [base.optimizer] + [
        o for o in ("adamw8bit", "adafactor") if o in optimizers and o != base.optimizer
    ]
    if method == "textual_inversion":
        opts = [base.optimizer]  # a few thousand trained values: the optimizer never matters
    te_frozen = method not in ("textual_inversion", "pivotal") and not recipe.adapter.train_text_encoder
    prompts = (
        {base.cache_prompts, True} if te_frozen and not recipe.data.shuffle_tags else {base.cache_prompts}
    )
    fusable = method == "dreambooth" and base.processes == 1  # tuner train refuses it with several processes
    out = []
    for cache, prompt, mp, wd, opt, fused, gc, b, r, ema, shard, grads, split in itertools.product(
        {base.cache_latents, True} if recipe.data.center_crop else {base.cache_latents},
        prompts,
        precisions,
        {base.weight_dtype, "auto", "fp8"},
        opts,
        {base.fused_backward, True} if fusable else {base.fused_backward},
        {base.gradient_checkpointing, True},
        batches,
        resolutions,
        {base.ema_on_cpu, True} if recipe.train.ema_decay > 0 else {base.ema_on_cpu},
        {base.shard_states, True} if base.processes > 1 else {base.shard_states},
        {base.shard_gradients, True} if base.processes > 1 else {base.shard_gradients},
        {base.shard_frozen, True} if base.processes > 1 and method != "dreambooth" else {base.shard_frozen},
    ):
        if grads and not shard:  # ZeRO-2 shards the states too
            continue
        accumulation = base.gradient_accumulation * max(1, base.batch_size // b)
        if fused and not base.fused_backward and (accumulation > 1 or mp == "fp16"):
            continue
        s = replace(
            base,
            cache_latents=cache,
            cache_prompts=prompt,
            mixed_precision=mp,
            weight_dtype=wd,
            optimizer=opt,
            fused_backward=fused,
            gradient_checkpointing=gc,
            batch_size=b,
            resolution=r,
            gradient_accumulation=accumulation,
            ema_on_cpu=ema,
            shard_states=shard,
            shard_gradients=grads,
            shard_frozen=split,
        )
        cost = (
            _COST["cache_latents"] * (cache != base.cache_latents)
            + _COST["cache_prompts"] * (prompt != base.cache_prompts)
            + _COST["mixed_precision"] * (mp != base.mixed_precision)
            + _COST["fp8_weights" if wd == "fp8" else "weight_dtype"] * (wd != base.weight_dtype)
            + (_COST[opt] if opt != base.optimizer else 0)
            + _COST["fused_backward"] * (fused != base.fused_backward)
            + _COST["gradient_checkpointing"] * (gc != base.gradient_checkpointing)
            + _COST["ema_on_cpu"] * (ema != base.ema_on_cpu)
            + _COST["shard_states"] * (shard != base.shard_states)
            + _COST["shard_gradients"] * (grads != base.shard_gradients)
            + _COST["shard_frozen"] * (split != base.shard_frozen)
            + _COST["halve_batch"] * (base.batch_size // b).bit_length() * (b != base.batch_size)
            + _COST["resolution_64"] * (base.resolution - r) // 64
        )
        out.append((cost, s))
    return out


def fit(sk: Skeleton, recipe: Recipe, vram_gb: float, processes: int = 1) -> Plan | None:
    """The cheapest settings whose predicted device peak (tensors, allocator slack and the CUDA context)
    fits ``vram_gb`` on each of ``processes`` devices; among equal costs the smallest peak. None: nothing
    tried fits."""
    from tuner.optim.optimizers import OPTIMIZERS

    base = settings_from_recipe(recipe, sk.family.resolution, processes)
    budget = vram_gb * GB
    best: tuple[int, int, Plan] | None = None
    # cheapest first: once something fits, only candidates of the same cost can still win
    for cost, s in sorted(candidates(recipe, base, sk.family.resolution, OPTIMIZERS), key=lambda c: c[0]):
        if best is not None and cost > best[0]:
            break
        plan = plan_for(sk, recipe, s)
        if plan.device_bytes <= budget and (best is None or (cost, plan.device_bytes) < best[:2]):
            best = (cost, plan.device_bytes, plan)
    return best[2] if best else None


def changes(before: Settings, after: Settings, max_grad_norm: float = 0.0) -> list[str]:
    """Recipe overrides (``--set`` syntax) that turn ``before`` into ``after``."""
    keys = {
        "resolution": "data.resolution",
        "batch_size": "train.batch_size",
        "gradient_accumulation": "train.gradient_accumulation",
        "mixed_precision": "train.mixed_precision",
        "gradient_checkpointing": "train.gradient_checkpointing",
        "optimizer": "optim.optimizer",
        "cache_latents": "train.cache_latents",
        "cache_prompts": "train.cache_prompts",
        "weight_dtype": "train.weight_dtype",
        "fused_backward": "optim.fused_backward",
        "ema_on_cpu": "train.ema_on_cpu",
        "shard_states": "optim.shard_states",
        "shard_gradients": "optim.shard_gradients",
        "shard_frozen": "train.shard_frozen",
    }
    out = []
    for name, key in keys.items():
        a, b = getattr(before, name), getattr(after, name)
        if a != b:
            value = str(b).lower() if isinstance(b, bool) else b
            out.append(f"{key}={value}")
    if after.fused_backward and not before.fused_backward and max_grad_norm > 0:
        out.append("train.max_grad_norm=0")  # fused steps happen before the global norm is known
    return out


def presets(
    sk: Skeleton, recipe: Recipe, sizes: tuple[float, ...] = PRESET_GB, processes: int = 1
) -> list[dict[str, Any]]:
    base = settings_from_recipe(recipe, sk.family.resolution, processes)
    rows = []
    for gb in sizes:
        plan = fit(sk, recipe, gb, processes)
        rows.append(
            {
                "vram_gb": gb,
                "fits": plan is not None,
                "changes": changes(base, plan.settings, recipe.train.max_grad_norm) if plan else [],
                "predicted_gb": round(plan.device_bytes / GB, 2) if plan else None,
            }
        )
    return rows


def format_plan(plan: Plan) -> str:
    s = plan.settings
    lines = [
        f"plan: {plan.method} on {plan.family}, {s.resolution} px, batch {s.batch_size}"
        f"{' (x2 with prior preservation)' if plan.batch_on_device != s.batch_size else ''}, "
        f"accumulation {s.gradient_accumulation}, mixed_precision {s.mixed_precision}, optimizer {s.optimizer}, "
        f"gradient_checkpointing {str(s.gradient_checkpointing).lower()}, cache_latents {str(s.cache_latents).lower()}"
        + (f", {s.processes} processes (figures per process)" + (", optimizer states" + (" and gradients" if s.shard_gradients else "") + " sharded" if s.shard_states else "")
           if s.processes > 1 else ""),
        "",
        f"| {'component':<18} | {'MB':>10} | note",
        f"|{'-' * 20}|{'-' * 12}|-----",
    ]
    for c in plan.components:
        lines.append(f"| {c.name:<18} | {c.bytes / MB:>10,.1f} | {c.note}")
    lines += [
        f"| {'total (tensors)':<18} | {plan.total_bytes / MB:>10,.1f} | predicted peak of PyTorch's allocator",
        f"| {'+ CUDA overhead':<18} | {plan.device_bytes / MB:>10,.1f} | "
        f"+{ALLOCATOR_SLACK:.0%} allocator slack, +{CUDA_OVERHEAD_BYTES // MB} MB context: what must fit a GPU",
        "",
        f"trainable {plan.trainable_params:,} params, frozen {plan.frozen_params:,}; "
        f"step {plan.step_flops / 1e12:,.2f} TFLOP (forward x3{' +1 recompute' if s.gradient_checkpointing else ''})",
        f"time per step: FLOPs at {UTILISATION[0]:.0%}-{UTILISATION[1]:.0%} of peak "
        f"{'bf16/fp16 tensor-core' if s.mixed_precision != 'no' else 'fp32'} FLOPS (spec sheets) + "
        f"{HOST_SECONDS_PER_LAYER_CALL[0] * 1e6:.0f}-{HOST_SECONDS_PER_LAYER_CALL[1] * 1e6:.0f} us of host time "
        f"per UNet layer call"
        + (f" and {HOST_SECONDS_PER_TENSOR_STEP[0] * 1e6:.0f}-{HOST_SECONDS_PER_TENSOR_STEP[1] * 1e6:.0f} us per "
           "trained tensor (a tensor-by-tensor optimizer step)" if _steps_tensor_by_tensor(s) else "")
        + " (fitted on an H100 with bench/gpu.py; other cards not measured):",
    ]
    for row in plan.times:
        lines.append(f"  {row['device']:<16} {row['seconds_min']:.3g}-{row['seconds_max']:.3g} s")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_presets(rows: list[dict[str, Any]]) -> str:
    lines = ["| VRAM | predicted | settings to change |", "|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['vram_gb']} GB | - | nothing tried fits |")
        else:
            lines.append(
                f"| {r['vram_gb']} GB | {r['predicted_gb']} GB | "
                f"{' '.join('--set ' + c for c in r['changes']) or 'fits as is'} |"
            )
    return "\n".join(lines)
