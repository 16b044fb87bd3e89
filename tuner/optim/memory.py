"""Memory settings applied to the base model's modules: attention kernel, storage dtype of frozen weights,
memory layout, and moving frozen components off the training device.

Plain functions over modules (no recipe): :func:`tuner.train.setup.setup_run` decides what to call.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tuner.errors import TunerError

ATTENTION = ("sdpa", "eager")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def set_attention(module: Any, kind: str) -> None:
    """Use diffusers' ``AttnProcessor2_0`` (``sdpa``: ``F.scaled_dot_product_attention``, which picks a flash
    or memory-efficient kernel on GPUs and never materialises the ``[B, heads, N, N]`` scores there) or
    ``AttnProcessor`` (``eager``: baddbmm, softmax, bmm) in every attention layer of a diffusers model.
    A module without ``set_attn_processor`` (a text encoder) is left alone."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind not in ATTENTION:
        raise TunerError(f"train.attention = {kind!r}: choose from {', '.join(ATTENTION)}")
    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def attention_kinds(module: Any) -> set[str]:
    """``{"sdpa"}``, ``{"eager"}`` (or a mix, or another processor's class name) for a diffusers model."""
    names = {"AttnProcessor2_0": "sdpa", "AttnProcessor": "eager"}
    return {names.get(type(p).__name__, type(p).__name__) for p in module.attn_processors.values()}


def frozen_dtype(mixed_precision: str, weight_dtype: str, *, autocast_active: bool) -> torch.dtype:
    """Storage dtype of frozen weights: the autocast dtype when autocast really runs (accelerate runs no fp16
    autocast on the CPU) unless ``weight_dtype = "fp32"``, else fp32. With ``bf16``/``fp8`` it is the dtype the
    narrow-stored layers compute in (:func:`store_frozen`) and the storage of every other frozen weight."""
    if weight_dtype != "fp32" and autocast_active and mixed_precision in HALF:
        return HALF[mixed_precision]
    return torch.float32


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating-point parameter that does not require grad to ``dtype``, in place; trained
    tensors (LoRA factors, placeholder rows, a fully trained UNet) stay as they are (fp32). Returns the
    number of values cast."""
    count = 0
    with torch.no_grad():
        for p in module.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                count += p.numel()
    return count


def to_channels_last(module: nn.Module) -> None:
    """Store the module's 4-D weights in the channels-last layout (NHWC); 2-D weights are unaffected."""
    module.to(memory_format=torch.channels_last)


def offload(module: nn.Module) -> None:
    """Move a frozen component to the CPU (it is needed again only for previews and export) and give the
    freed accelerator memory back to the allocator's pool."""
    before = _device_of(module)
    module.to("cpu")
    if before.type == "cuda":
        torch.cuda.empty_cache()


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """peft's adapter layers inside ``module`` (LoRA Linear/Conv wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_input_casts_off(layers: list[nn.Module]) -> Iterator[None]:
    """Inside autocast: peft's adapter layers stop casting their input to the adapter's fp32 dtype.

    peft casts a bf16 input up to the fp32 ``lora_A`` weight and autocast casts both straight back down for
    the matmul: two copies per layer per pass, and the same again in backward, with identical results (a
    bf16 -> fp32 -> bf16 round trip is exact). Outside autocast (previews with bf16 frozen weights) the cast is
    needed, so it is switched off only for the block this context covers."""
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


# --- frozen weights stored below the compute precision ------------------------------------------------------

STORAGE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
"""``train.weight_dtype`` values that store frozen Linear/Conv2d weights in a narrower dtype than the one they
compute in (fp32, or the autocast dtype)."""
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: fp8 weights are scaled per output channel to use its whole range."""


@dataclass(frozen=True)
class WeightShard:
    """A frozen weight split between the data-parallel processes (``train.shard_frozen``): this process
    keeps elements ``rank*n .. (rank+1)*n`` of the flattened weight, zero-padded to ``world*n``; the whole
    ``shape`` is gathered from every process for each use."""

    rank: int
    world: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The whole weight from every process's part: a collective, every process must call it in turn."""
        import torch.distributed as dist

        raw = part.contiguous().view(torch.uint8)  # as bytes: not every backend takes bf16 or fp8
        parts = [torch.empty_like(raw) for _ in range(self.world)]
        dist.all_gather(parts, raw)
        return torch.cat(parts).view(part.dtype)[: self.numel].view(self.shape)


def _restore(
    weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, shard: WeightShard | None = None
) -> torch.Tensor:
    w = (shard.gather(weight) if shard is not None else weight).to(dtype)
    return w if scale is None else w * scale.to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _StoredLinearFn(torch.autograd.Function):
    """``F.linear`` with a frozen low-precision weight: widened for the matmul, and again in backward, so
    only the stored (narrow) weight is kept for the gradient of the input."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, shard):
        ctx.save_for_backward(weight, scale)
        ctx.shard = shard
        return F.linear(x, _restore(weight, scale, _compute_dtype(x), shard), bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            return grad @ _restore(weight, scale, grad.dtype, ctx.shard), None, None, None, None


class _StoredConv2dFn(torch.autograd.Function):
    """``F.conv2d`` with a frozen low-precision weight (see :class:`_StoredLinearFn`)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, shard, stride, padding, dilation, groups):
        ctx.save_for_backward(weight, scale)
        ctx.conv, ctx.shard = (x.shape, stride, padding, dilation, groups), shard
        w = _restore(weight, scale, _compute_dtype(x), shard)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        with torch.autocast(grad.device.type, enabled=False):
            w = _restore(weight, scale, grad.dtype, ctx.shard)
            grad_x = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None, None


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored narrow (:func:`store_frozen`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StoredLinearFn.apply(x, self.weight, self.weight_scale, self.bias, self.weight_shard)


class StoredConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored narrow (:func:`store_frozen`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StoredConv2dFn.apply(
            x, self.weight, self.weight_scale, self.bias, self.weight_shard, self.stride, self.padding,
            self.dilation, self.groups,
        )


_STORED = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}
_NARROW = tuple(_STORED.values())


def storable(layer: nn.Module) -> bool:
    """Whether :func:`store_frozen` can store ``layer``'s weight narrow (when it is frozen): a plain
    ``nn.Linear`` or ``nn.Conv2d`` with explicit zero padding (what ``conv2d_input`` takes); the planner
    counts the same layers."""
    if type(layer) not in _STORED:
        return False
    return not isinstance(layer, nn.Conv2d) or (layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its first parameter's, or what that layer widens to when its weight
    is stored narrow (:func:`store_frozen`)."""
    for layer in module.modules():
        if isinstance(layer, _NARROW):
            return layer.wide_dtype
        for p in layer.parameters(recurse=False):
            return p.dtype
    return torch.float32


def store_frozen(module: nn.Module, dtype: torch.dtype, *, rank: int = 0, world: int = 1) -> int:
    """Store the weight of every frozen ``nn.Linear``/``nn.Conv2d`` inside ``module`` as ``dtype`` (bf16 or
    float8_e4m3fn, or the weight's own dtype), computed at the input's dtype (or autocast's): each layer widens
    its weight for its own matmul only, so the model holds the narrow copy and one layer's wide copy at a
    time. fp8 weights carry an fp32 scale per output channel (absmax / 448). Biases, norms and embeddings keep
    their dtype (they are copied, so that no tensor keeps a checkpoint's file mapping, and its wide pages,
    alive); trained weights (LoRA factors, a fully trained UNet) are not touched. Returns the number of
    weights stored.

    ``world > 1`` (``train.shard_frozen``): this process keeps only its ``1/world`` part of each stored weight
    (:class:`WeightShard`), and every forward and backward pass gathers the whole weight from the others, so
    every process must run the same passes in the same order. :func:`restore_frozen` undoes it (before writing
    the model; with shards it is a collective too)."""
    count = 0
    with torch.no_grad():
        for layer in module.modules():
            if not storable(layer) or layer.weight.requires_grad or not layer.weight.is_floating_point():
                continue
            layer.wide_dtype = layer.weight.dtype  # what restore_frozen gives back
            wide = layer.weight.data
            w = wide.float()
            scale = None
            if dtype == torch.float8_e4m3fn:
                scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / FP8_MAX
                w = w / scale
            shard = None
            if world > 1:  # this process's part of the flattened weight (the last part zero-padded)
                shard = WeightShard(rank, world, tuple(w.shape))
                n = -(-w.numel() // world)
                w = F.pad(w.reshape(-1), (0, n * world - w.numel()))[rank * n : (rank + 1) * n]
            layer.weight.data = w.to(dtype).clone() if shard is not None else w.to(dtype)
            layer.weight_shard = shard
            del w
            _page_out(wide)  # read from a checkpoint's file mapping: its pages need not stay resident
            layer.register_buffer("weight_scale", scale, persistent=False)
            layer.__class__ = _STORED[type(layer)]
            count += shard.numel if shard is not None else layer.weight.numel()
        if count:  # loaded weights may be views of the checkpoint's file mapping, which stays resident while any
            for layer in module.modules():  # tensor still points into it: copy the rest out, the mapping goes
                for name, p in layer.named_parameters(recurse=False):
                    if not p.requires_grad and not (name == "weight" and isinstance(layer, _NARROW)):
                        p.data = p.data.clone()
    return count


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; never changes their contents


@functools.cache
def _libc():
    """The C library (``madvise``, glibc's ``malloc_trim``), looked up once: ``find_library`` runs a
    subprocess on Linux. None where there is none to load."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def _page_out(t: torch.Tensor) -> None:
    """Ask the kernel to reclaim the host pages under ``t`` (Linux; elsewhere, or on a device, nothing).
    Clean pages of a checkpoint's file mapping leave the process's resident set and are read again from
    the file if touched; anonymous memory is untouched without swap. So narrowing a model layer by layer
    never holds the whole wide model resident on top of the narrow one."""
    import ctypes
    import mmap

    if t.device.type != "cpu" or not t.numel() or not t.is_contiguous():
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = (start + page - 1) // page * page, end // page * page  # whole pages inside the tensor only
    if last <= first:
        return
    madvise = getattr(_libc(), "madvise", None)
    if madvise is not None:  # elsewhere the pages go when the mapping does (store_frozen copies the rest out)
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def return_freed_memory() -> None:
    """Hand memory freed on the host back to the OS (glibc's ``malloc_trim``; elsewhere nothing): weights
    narrowed in place leave their wide copies in the allocator's free lists, which would keep the process's
    resident size at the wide model's."""
    import gc

    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def restore_frozen(module: nn.Module) -> int:
    """Undo :func:`store_frozen`: widen every stored weight back to the dtype it had (times its scale) and
    give the layer back its plain class. Returns the number of weights restored."""
    count = 0
    plain = {v: k for k, v in _STORED.items()}
    with torch.no_grad():
        for layer in module.modules():
            if type(layer) not in plain:
                continue
            layer.weight.data = _restore(layer.weight.data, layer.weight_scale, layer.wide_dtype, layer.weight_shard)
            del layer._buffers["weight_scale"], layer.wide_dtype, layer.weight_shard
            layer.__class__ = plain[type(layer)]
            count += layer.weight.numel()
    return count
