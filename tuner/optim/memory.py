"""Memory settings applied to the base model's modules: attention kernel, storage dtype of frozen weights,
memory layout, and moving frozen components off the training device.

Plain functions over modules (no recipe): :func:`tuner.train.setup.setup_run` decides what to call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

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
    """Storage dtype of frozen weights: the autocast dtype when ``weight_dtype = "auto"`` and autocast really
    runs (accelerate runs no fp16 autocast on the CPU), else fp32."""
    if weight_dtype == "auto" and autocast_active and mixed_precision in HALF:
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
