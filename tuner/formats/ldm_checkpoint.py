"""Full-model state dicts: diffusers component names -> the original single-file (LDM) layout.

A1111, ComfyUI and most sharing sites use one ``.safetensors`` file with every component under a prefix:

| component | prefix in the file | naming inside |
|---|---|---|
| UNet | ``model.diffusion_model.`` | CompVis tree (``input_blocks.1.1.proj_in``), table in :mod:`tuner.formats.ldm` |
| VAE | ``first_stage_model.`` | CompVis autoencoder (``encoder.down.0.block.1.conv1``), :func:`vae_block_pairs` |
| CLIP text encoder (SD1, SDXL te1) | ``TextEncoderSpec.ldm_prefix`` | HF CLIP names from ``text_model.`` on |
| OpenCLIP text encoder (SD2, SDXL te2) | ``TextEncoderSpec.ldm_prefix`` | OpenCLIP ``transformer.resblocks.N`` with fused q/k/v |

(SD2's encoder also gets the parts SD2 does not use, see :func:`openclip_to_ldm`.)

This module writes that layout (tuner's own tables). Reading it back goes through diffusers' converters
(:mod:`tuner.models.single_file`), so the round-trip test checks these tables against an independent
implementation. Shapes that differ between the layouts: the VAE mid-block attention is 1x1 convolutions in
LDM (``[C, C, 1, 1]``) and Linear in diffusers (``[C, C]``); OpenCLIP's ``text_projection`` is the transpose
of the diffusers Linear weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tuner.formats.ldm import UnetLayout, to_ldm_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# UNet modules outside ldm.py's block table (it covers what LoRAs target; the output norm is not targeted).
UNET_EXTRA: dict[str, str] = {"conv_norm_out": "out.0"}


def unet_to_ldm(state: Mapping[str, torch.Tensor], layout: UnetLayout) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` keys.

    ``ValueError`` naming the key when a parameter has no LDM name (a UNet of another topology)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head in UNET_EXTRA:
            out[f"{UNET_PREFIX}{UNET_EXTRA[head]}.{rest}"] = tensor
        else:
            out[UNET_PREFIX + to_ldm_path(layout, key)] = tensor
    return out


@dataclass(frozen=True)
class VaePair:
    """One VAE block in both trees; ``kind`` picks the renames inside: ``resnet``, ``attention`` or ``plain``."""

    diffusers: str
    ldm: str
    kind: str = "plain"


VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_ATTENTION_CONVS = ("q", "k", "v", "proj_out")  # 1x1 convs in LDM, Linear in diffusers


def vae_block_pairs(levels: int, layers_per_block: int) -> tuple[VaePair, ...]:
    """Every block of an ``AutoencoderKL`` with ``levels`` resolution levels, diffusers -> LDM.

    The encoder's down block ``i`` is ``encoder.down.i``; the decoder's up blocks run the other way
    (diffusers' ``up_blocks.0`` is the lowest resolution, LDM's ``up.0`` the highest), so up block ``i`` is
    ``decoder.up.{levels-1-i}``, each with one resnet more than the encoder's blocks. Mid resnets are
    ``mid.block_1`` / ``mid.block_2`` and the mid attention ``mid.attn_1``.
    """
    pairs: list[VaePair] = []
    for i in range(levels):
        for j in range(layers_per_block):
            pairs.append(VaePair(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < levels - 1:
            pairs.append(VaePair(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        ldm_level = levels - 1 - i
        for j in range(layers_per_block + 1):
            pairs.append(VaePair(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}", "resnet"))
        if i < levels - 1:
            pairs.append(VaePair(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv"))
    for side in ("encoder", "decoder"):
        pairs.append(VaePair(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", "resnet"))
        pairs.append(VaePair(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", "resnet"))
        pairs.append(VaePair(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", "attention"))
        pairs.append(VaePair(f"{side}.conv_norm_out", f"{side}.norm_out"))
        pairs.append(VaePair(f"{side}.conv_in", f"{side}.conv_in"))
        pairs.append(VaePair(f"{side}.conv_out", f"{side}.conv_out"))
    pairs += [VaePair("quant_conv", "quant_conv"), VaePair("post_quant_conv", "post_quant_conv")]
    return tuple(pairs)


def vae_to_ldm(
    state: Mapping[str, torch.Tensor], *, levels: int, layers_per_block: int
) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` keys (attention weights as 1x1 convs)."""
    pairs = vae_block_pairs(levels, layers_per_block)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for pair in pairs:
            if not key.startswith(pair.diffusers + "."):
                continue
            rest = key[len(pair.diffusers) + 1 :]
            renames = {"resnet": VAE_RESNET_RENAMES, "attention": VAE_ATTENTION_RENAMES}.get(pair.kind, {})
            for src, dst in renames.items():
                if rest.startswith(src + "."):
                    rest = dst + rest[len(src) :]
                    break
            if pair.kind == "attention" and rest.split(".")[0] in VAE_ATTENTION_CONVS and rest.endswith(".weight"):
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            out[f"{VAE_PREFIX}{pair.ldm}.{rest}"] = tensor
            break
        else:
            raise ValueError(f"no LDM name for VAE parameter {key!r} ({levels} levels, {layers_per_block} resnets)")
    return out


def canonical_clip_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-encoder keys with the ``text_model.`` level that transformers >= 5 drops from
    ``CLIPTextModel`` (``CLIPTextModelWithProjection`` keeps it; its ``text_projection`` stays top-level)."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("text_model.") or key == "text_projection.weight":
            out[key] = tensor
        else:
            out["text_model." + key] = tensor
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text encoder -> ``{prefix}text_model.*`` (the LDM files keep HF's names under the prefix).
    A projection (``CLIPTextModelWithProjection``) has no place in this layout and is refused."""
    out = {}
    for key, tensor in canonical_clip_keys(state).items():
        if key == "text_projection.weight":
            raise ValueError(f"a CLIP text encoder stored under {prefix!r} has no text_projection")
        if key.endswith("position_ids"):
            continue
        out[prefix + key] = tensor
    return out


OPENCLIP_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


# OpenCLIP's initial logit_scale, log(1 / 0.07): written where the original files have one that no SD model uses.
OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)


def openclip_to_ldm(
    state: Mapping[str, torch.Tensor], prefix: str, *, dropped_layers: int = 0, unused_projection: bool = False
) -> dict[str, torch.Tensor]:
    """HF CLIP text encoder -> OpenCLIP layout under ``prefix``.

    ``layers.N.self_attn.{q,k,v}_proj`` become one ``transformer.resblocks.N.attn.in_proj_{weight,bias}``
    (rows q, k, v); ``text_projection.weight`` (Linear, ``[proj, width]``) becomes ``text_projection``
    (``[width, proj]``, used as ``x @ P``).

    SD2's OpenCLIP-H has parts the diffusers encoder does not keep because SD2 never uses them; the original
    files hold them, and so does ours, so that every reader finds the key set it knows:

    * ``dropped_layers`` more resblocks after the last one (SD2: the 24th; SD2 reads the penultimate layer).
      They are written as identity blocks (every weight and bias zero: ``x + 0 + 0``), so a reader that does
      run the last layer gets what SD2 conditions on.
    * ``unused_projection``: ``text_projection`` as the ``[width, width]`` identity and ``logit_scale``
      (OpenCLIP's initial value), for an encoder whose pooled output SD2 does not use.
    """
    state = canonical_clip_keys(state)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    layer_head = "text_model.encoder.layers."
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key in OPENCLIP_TOP:
            out[prefix + OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.t().contiguous()
        elif key.startswith(layer_head):
            index, _, rest = key[len(layer_head) :].partition(".")
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[proj] = tensor
                continue
            for src, dst in OPENCLIP_LAYER_RENAMES.items():
                if rest.startswith(src + "."):
                    rest = dst + rest[len(src) :]
                    break
            else:
                raise ValueError(f"no OpenCLIP name for text-encoder parameter {key!r}")
            out[block + rest] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for text-encoder parameter {key!r}")
    for name, parts in fused.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ValueError(f"{name}: q/k/v projections incomplete ({', '.join(sorted(parts))})")
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    if dropped_layers:
        layers = 1 + max(int(k[len(prefix) :].split(".")[2]) for k in out if ".resblocks." in k)
        last = f"{prefix}transformer.resblocks.{layers - 1}."
        for extra in range(layers, layers + dropped_layers):
            out.update({k.replace(last, f"{prefix}transformer.resblocks.{extra}."): torch.zeros_like(v)
                        for k, v in out.items() if k.startswith(last)})
    if unused_projection and prefix + "text_projection" not in out:
        embedding = out[prefix + "token_embedding.weight"]
        width = embedding.shape[1]
        out[prefix + "text_projection"] = torch.eye(width, dtype=embedding.dtype)
        out[prefix + "logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=embedding.dtype)
    return out
