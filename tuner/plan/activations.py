"""Saved activations and FLOPs of one UNet training step, derived block by block from the UNet's topology.

Memory of activations cannot be measured on the ``meta`` device, so each block's cost is counted from what
PyTorch's autograd keeps for the backward pass of its operations (per sample, in elements):

- ResNet block (``Ci`` -> ``Co`` channels, ``P`` pixels): GroupNorm keeps its input, SiLU its input, a
  conv its input: ``3*Ci*P + 3*Co*P`` (the 1x1 shortcut conv shares the block input in fp32).
- Transformer block (``C`` channels, ``N = P`` tokens, inner width ``I``, feed-forward width ``F``, ``L``
  prompt tokens): three LayerNorm inputs ``3*C*N``; q, k, v and the SDPA output ``4*I*N`` (flash /
  memory-efficient SDPA keeps no ``N x N`` matrix, and the output projection reads its output without a
  copy); cross-attention q and output ``2*I*N`` plus ``2*I*L``; GEGLU's projection output and GELU output
  ``3*F*N``. A Linear keeps its input only when its weight (or a LoRA on it) trains, so the projections'
  inputs (``C*N`` each, ``F*N`` for the second feed-forward layer) count only then.
- Transformer2DModel around its blocks: norm input, ``proj_in`` and ``proj_out`` inputs ``3*C*N``.
- Down-sampler convs keep their input, up-samplers their upsampled input; ``conv_in``/``conv_out`` and the
  output norm likewise.

Under autocast (fp16/bf16) norms run in fp32 and keep an fp32 copy of their input, and each Linear keeps
its own half-precision copy of an fp32 norm output, so those terms are split by dtype.

With gradient checkpointing (diffusers checkpoints each ResNet block and each transformer block) only the
inputs of the checkpointed units stay, plus everything outside them, plus one unit recomputed at a time
during backward.

The peak is found by walking the backward pass (:func:`backward_peak`): it runs the units in reverse, and
when it reaches unit ``k`` the activations saved by units ``0..k`` are still alive, unit ``k`` is being
recomputed (checkpointing), a few gradient-sized buffers of its feature map are in flight, and the weight
gradients of units ``k..end`` exist. For LoRA the gradients are negligible and the peak is the start of
backward; for a full fine-tune it is later, where the early high-resolution blocks' activations meet
almost every gradient (the sum of all activations and all gradients never exists at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Unit:
    """One block's per-sample cost. ``wide``: elements kept in fp32 even under autocast (norm inputs);
    ``narrow``: elements kept at the activation dtype; ``checkpointed``: diffusers recomputes it with
    gradient checkpointing, keeping only ``input`` elements (at the activation dtype); ``flops``: forward
    multiply-adds x 2."""

    name: str
    wide: int
    narrow: int
    input: int
    checkpointed: bool
    flops: int
    map: int = 0
    """Elements of the unit's largest feature map (its gradient flows through backward at this size)."""
    params: int = 0
    """Parameters of the unit's modules (their gradients appear when backward passes the unit)."""
    inner: int = 0
    """Elements of the largest tensor inside the unit (a transformer block's feed-forward hidden state):
    its gradient exists while backward crosses the unit. 0: the same as ``map``."""


@dataclass(frozen=True)
class ActivationEstimate:
    saved_bytes: int
    """Kept for backward at the end of the forward pass (the whole batch)."""
    workspace_bytes: int
    """Transient: the largest recomputed unit (checkpointing) and a few activation-sized gradient buffers."""
    forward_flops: int
    """One forward pass of the whole batch."""
    largest_unit: str
    units: tuple[Unit, ...] = ()
    """Per-sample units in forward order (for :func:`backward_peak`)."""
    batch: int = 1
    act_bytes: int = 4
    checkpointing: bool = False
    params: int = 0
    """All UNet parameters (units and the embeddings outside them)."""


def _base(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft LoRA layer (a live model with an adapter attached), else the module."""
    return getattr(module, "base_layer", module)


def _params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _conv_flops(conv: nn.Module, out_pixels: int) -> int:
    conv = _base(conv)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * conv.in_channels // conv.groups * conv.out_channels * k * out_pixels


@dataclass(frozen=True)
class Saving:
    """Which Linear inputs autograd keeps: a Linear keeps its input only when its weight trains (or a LoRA
    on it does); convolutions always keep theirs. ``attention``: q/k/v/out projections; ``other``:
    feed-forward and Linear ``proj_in``/``proj_out``. ``autocast``: fp16/bf16 autocast is on."""

    attention: bool
    other: bool
    autocast: bool

    @classmethod
    def for_training(cls, trained: str, autocast: bool) -> Saving:
        """``trained``: ``all`` (full fine-tune), ``none`` (frozen UNet, e.g. textual inversion) or a LoRA
        target preset (``attention``, ``attention_ff_proj``, ``kohya``, ``locon``)."""
        return cls(attention=trained != "none", other=trained not in ("none", "attention"), autocast=autocast)


def _resnet(name: str, block: nn.Module, pixels: int, saving: Saving) -> Unit:
    ci, co = _base(block.conv1).in_channels, _base(block.conv1).out_channels
    flops = _conv_flops(block.conv1, pixels) + _conv_flops(block.conv2, pixels)
    if getattr(block, "conv_shortcut", None) is not None:
        flops += _conv_flops(block.conv_shortcut, pixels)
    # norm1/silu1/conv1 inputs, norm2/silu2/conv2 inputs (the shortcut conv shares the block input); under
    # autocast the norm and SiLU inputs are fp32 and the convs keep half copies (the shortcut its own)
    if not saving.autocast:
        return Unit(
            name,
            wide=0,
            narrow=3 * (ci + co) * pixels,
            input=ci * pixels,
            checkpointed=True,
            flops=flops,
            map=max(ci, co) * pixels,
            params=_params(block),
        )
    shortcut = ci if block.conv_shortcut is not None else 0
    return Unit(
        name,
        wide=2 * (ci + co) * pixels,
        narrow=(ci + co + shortcut) * pixels,
        input=ci * pixels,
        checkpointed=True,
        flops=flops,
        map=max(ci, co) * pixels,
        params=_params(block),
    )


def _transformer_block(
    name: str, block: nn.Module, tokens: int, context: int, context_dim: int, saving: Saving
) -> Unit:
    c = block.norm1.normalized_shape[0]
    inner = _base(block.attn1.to_q).out_features
    ff_in = _base(block.ff.net[0].proj)
    f = _base(block.ff.net[2]).in_features
    gated = ff_in.out_features == 2 * f
    n, L = tokens, context
    a, o = int(saving.attention), int(saving.other)
    # three LayerNorm inputs; SDPA keeps q, k, v and its output, whose layout the output projection reads
    # without a copy; the projections' inputs only when they train (autocast: q, k, v cast the norm output
    # apart, three copies)
    qkv_in = (3 if saving.autocast else 1) * c * n * a
    attn1 = qkv_in + 4 * inner * n
    attn2 = a * c * n + 2 * inner * n + 2 * inner * L + a * 2 * context_dim * L
    ff = o * c * n + (2 * f if gated else f) * n + (f * n if gated else 0) + o * f * n
    flops = 2 * n * (4 * c * inner + f * (3 if gated else 2) * c)  # q,k,v,out of attn1; ff
    flops += 2 * (n * c * inner * 2 + 2 * L * context_dim * inner)  # attn2 q,out; k,v over the prompt
    flops += 2 * 2 * inner * n * (n + L)  # QK^T and AV, both attentions
    return Unit(
        name,
        wide=3 * c * n,
        narrow=attn1 + attn2 + ff,
        input=c * n,
        checkpointed=True,
        flops=flops,
        map=c * n,
        params=_params(block),
        inner=(2 * f if gated else f) * n,
    )


def _transformer(
    name: str, model: nn.Module, pixels: int, context: int, context_dim: int, saving: Saving
) -> list[Unit]:
    c = model.norm.num_channels
    proj = (_base(model.proj_in), _base(model.proj_out))
    flops = sum(
        2
        * (m.in_features * m.out_features if isinstance(m, nn.Linear) else m.in_channels * m.out_channels)
        * pixels
        for m in proj
    )
    kept = sum(1 for m in proj if isinstance(m, nn.Conv2d) or saving.other)
    units = [
        Unit(
            f"{name}.norm+proj",
            wide=c * pixels,
            narrow=kept * c * pixels,
            input=0,
            checkpointed=False,
            flops=flops,
            map=c * pixels,
            params=_params(model.norm, model.proj_in, model.proj_out),
        )
    ]
    for i, block in enumerate(model.transformer_blocks):
        units.append(_transformer_block(f"{name}.block{i}", block, pixels, context, context_dim, saving))
    return units


def _plain(name: str, elements: int, flops: int, map_: int, module: nn.Module) -> Unit:
    return Unit(
        name,
        wide=0,
        narrow=elements,
        input=0,
        checkpointed=False,
        flops=flops,
        map=map_,
        params=_params(module),
    )


def unet_units(unet: nn.Module, height: int, width: int, context: int, saving: Saving) -> list[Unit]:
    """Per-sample units of ``unet`` at latent size ``height x width`` with ``context`` prompt tokens."""
    h, w = height, width
    ctx_dim = unet.config.cross_attention_dim
    units = [
        _plain(
            "conv_in",
            _base(unet.conv_in).in_channels * h * w,
            _conv_flops(unet.conv_in, h * w),
            _base(unet.conv_in).out_channels * h * w,
            unet.conv_in,
        )
    ]

    def stage(prefix: str, block: nn.Module, h: int, w: int) -> list[Unit]:
        out = []
        attentions = getattr(block, "attentions", None) or []
        for i, resnet in enumerate(block.resnets):
            if prefix.startswith("mid") and i > 0 and attentions:  # mid: resnet, (attn, resnet)...
                out += _transformer(
                    f"{prefix}.attn{i - 1}", attentions[i - 1], h * w, context, ctx_dim, saving
                )
            out.append(_resnet(f"{prefix}.resnet{i}", resnet, h * w, saving))
            if not prefix.startswith("mid") and i < len(attentions):
                out += _transformer(f"{prefix}.attn{i}", attentions[i], h * w, context, ctx_dim, saving)
        return out

    for d, block in enumerate(unet.down_blocks):
        units += stage(f"down{d}", block, h, w)
        for sampler in block.downsamplers or []:
            before = h * w
            h, w = (h + 1) // 2, (w + 1) // 2
            units.append(
                _plain(
                    f"down{d}.downsample",
                    _base(sampler.conv).in_channels * before,
                    _conv_flops(sampler.conv, h * w),
                    _base(sampler.conv).in_channels * before,
                    sampler,
                )
            )
    if unet.mid_block is not None:
        units += stage("mid", unet.mid_block, h, w)
    for u, block in enumerate(unet.up_blocks):
        units += stage(f"up{u}", block, h, w)
        for sampler in block.upsamplers or []:
            h, w = h * 2, w * 2
            units.append(
                _plain(
                    f"up{u}.upsample",
                    _base(sampler.conv).in_channels * h * w,
                    _conv_flops(sampler.conv, h * w),
                    _base(sampler.conv).in_channels * h * w,
                    sampler,
                )
            )
    c0 = _base(unet.conv_out).in_channels
    units.append(
        Unit(
            "norm_out+conv_out",
            wide=2 * c0 * h * w,
            narrow=c0 * h * w,
            input=0,
            checkpointed=False,
            flops=_conv_flops(unet.conv_out, h * w),
            map=c0 * h * w,
            params=_params(unet.conv_norm_out, unet.conv_out),
        )
    )
    return units


def estimate_unet(
    unet: nn.Module,
    *,
    height: int,
    width: int,
    context: int,
    batch: int,
    act_bytes: int,
    checkpointing: bool,
    trained: str = "all",
) -> ActivationEstimate:
    """Saved activations and forward FLOPs of ``batch`` samples. ``act_bytes``: 4 (fp32) or 2 (autocast);
    ``trained``: what trains in the UNet (see :meth:`Saving.for_training`)."""
    units = unet_units(unet, height, width, context, Saving.for_training(trained, act_bytes == 2))
    wide_bytes = 4

    def full(u: Unit) -> int:
        return u.wide * wide_bytes + u.narrow * act_bytes

    saved = 0
    for u in units:
        saved += u.input * act_bytes if (checkpointing and u.checkpointed) else full(u)
    largest = max((u for u in units if u.checkpointed), key=full)
    # a few activation-sized buffers live at once (an op's output, the gradient flowing back and the
    # gradient being produced): three of the largest feature map
    biggest_map = max(u.input for u in units if u.checkpointed) * act_bytes
    workspace = 3 * biggest_map + (full(largest) if checkpointing else 0)
    return ActivationEstimate(
        saved_bytes=saved * batch,
        workspace_bytes=workspace * batch,
        forward_flops=sum(u.flops for u in units) * batch,
        largest_unit=largest.name,
        units=tuple(units),
        batch=batch,
        act_bytes=act_bytes,
        checkpointing=checkpointing,
        params=_params(unet),
    )


@dataclass(frozen=True)
class Moment:
    """What is alive at the worst moment of forward + backward (bytes, the whole batch)."""

    where: str
    saved: int
    """Activations saved for backward and not yet used (plus ``before``: the text encoder's)."""
    workspace: int
    """In flight: gradient buffers of the current unit's feature map and, with checkpointing, its
    recomputed activations."""
    gradient_params: int
    """UNet parameters whose gradient exists then (only when the whole UNet trains; else 0)."""


GRADIENT_BUFFERS = 3
"""Buffers in flight while backward crosses a unit: the gradient arriving at its output and the one being
produced for its input (feature-map sized), and the gradient of its largest inner tensor."""


def backward_peak(
    est: ActivationEstimate, *, unet_trains: bool, grad_bytes: int = 4, before: int = 0
) -> Moment:
    """Walk the backward pass of ``est`` (its units in reverse) and return the moment where saved
    activations + workspace + the UNet's weight gradients (``unet_trains``: a full fine-tune, at
    ``grad_bytes`` per parameter) are largest. ``before``: activations saved before the UNet ran (a text
    encoder in the graph), alive until backward leaves the UNet."""
    units, b, ab = est.units, est.batch, est.act_bytes

    def full(u: Unit) -> int:
        return (u.wide * 4 + u.narrow * ab) * b

    kept = [u.input * ab * b if (est.checkpointing and u.checkpointed) else full(u) for u in units]
    best = Moment("forward end", before + sum(kept), 0, 0)
    alive, grads = before + sum(kept), 0
    for u, k in zip(reversed(units), reversed(kept), strict=True):
        grads += u.params if unet_trains else 0
        buffers = (GRADIENT_BUFFERS - 1) * u.map + max(u.map, u.inner)
        work = buffers * ab * b + (full(u) if est.checkpointing and u.checkpointed else 0)
        if (
            alive + work + grads * grad_bytes
            > best.saved + best.workspace + best.gradient_params * grad_bytes
        ):
            best = Moment(f"backward through {u.name}", alive, work, grads)
        alive -= k
    return best


def text_encoder_activation_bytes(encoder: nn.Module, tokens: int, batch: int, act_bytes: int) -> int:
    """Saved activations of a CLIP text encoder in the graph (trained, or with trainable token vectors):
    per layer and token two LayerNorm inputs, q/k/v input, q, k, v, attention output, out-proj input,
    fc1 input, fc1 output and activation output (about 17 x hidden), plus the heads x L x L attention
    probabilities of its causal-masked attention."""
    cfg = encoder.config
    d, heads, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    ff = cfg.intermediate_size
    per_layer = tokens * (2 * d * 4 + (5 * d + d + 2 * ff) * act_bytes) + heads * tokens * tokens * act_bytes
    return layers * per_layer * batch


def text_encoder_flops(encoder: nn.Module, tokens: int, batch: int) -> int:
    cfg = encoder.config
    d, layers, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    return layers * batch * (2 * tokens * (4 * d * d + 2 * d * ff) + 4 * tokens * tokens * d)


def vae_encode_flops(vae: nn.Module, height: int, width: int, batch: int) -> int:
    """Forward FLOPs of the VAE encoder on ``batch`` images (convs only; pixel size ``height x width``)."""
    total, h, w = 0, height, width
    for m in vae.encoder.modules():
        if isinstance(m, nn.Conv2d):
            stride = m.stride[0]
            # the encoder's resolution drops at each downsampler; approximate by tracking stride-2 convs
            if stride == 2:
                h, w = h // 2, w // 2
            total += _conv_flops(m, h * w)
    return total * batch


def vae_encode_workspace(vae: nn.Module, height: int, width: int, batch: int, bytes_: int) -> int:
    """Transient memory of a no-grad VAE encode: a few feature maps at full resolution."""
    c0 = vae.config.block_out_channels[0]
    return 4 * c0 * height * width * batch * bytes_
