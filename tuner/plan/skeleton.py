"""A base model's components built on PyTorch's ``meta`` device from their configs: parameter counts and
shapes without a single weight in memory, for any base ``tuner`` can train and any family it knows.

Config sources, in order: ``family`` given (the family's shipped configs; the tiny base's own), the
embedded ``tiny`` base, a diffusers folder (``<component>/config.json``), a single-file checkpoint (its
family's shipped configs; the file's header alone says the family).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError
from tuner.models.families import TINY, Family, get_family
from tuner.optim.memory import storable


@dataclass
class Skeleton:
    """Meta-device components. ``text_encoders``: component -> module, in the family's order.
    ``context_tokens``: prompt length the UNet's cross-attention sees (77 for SD, 32 for tiny)."""

    family: Family
    unet: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    context_tokens: int

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @functools.cached_property
    def unet_layers(self) -> int:
        """The UNet's leaf modules that do work (dropout aside): one call each per pass. Counted once: the
        planner asks for every settings variant it tries."""
        return sum(1 for m in self.unet.modules() if not next(m.children(), None) and not isinstance(m, nn.Dropout))


def _tiny_configs() -> dict[str, dict[str, Any]]:
    from tuner.models.base import TINY_ASSETS

    if (TINY_ASSETS / "model_index.json").exists():
        return _folder_configs(TINY_ASSETS, TINY)
    from tuner.models.tiny import UNET_CONFIG, VAE_CONFIG, text_encoder_config

    return {"unet": dict(UNET_CONFIG), "vae": dict(VAE_CONFIG), "text_encoder": text_encoder_config(256, 0, 1)}


def _folder_configs(folder: Path, family: Family) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ("unet", "vae", *(te.component for te in family.text_encoders)):
        path = folder / name / "config.json"
        try:
            out[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TunerError(f"cannot read '{path}': {exc}") from None
    return out


def _shipped_configs(family: Family) -> dict[str, dict[str, Any]]:
    from tuner.models.single_file import family_config

    names = ("unet", "vae", *(te.component for te in family.text_encoders))
    return {name: family_config(family, name) for name in names}


def component_configs(
    base: str, family: str | None = None, prediction_type: str | None = None
) -> tuple[Family, dict[str, dict[str, Any]]]:
    """(family, component -> config dict) for ``base`` (a ``model.base`` value), or for ``family`` when
    given (no base needed: ``tuner plan --family sdxl``). Reads JSON and safetensors headers only.
    ``prediction_type``: as ``load_base`` takes it (an SD2.x single file)."""
    if family is not None:
        fam = get_family(family)
        return fam, (_tiny_configs() if fam is TINY else _shipped_configs(fam))
    if base == "tiny":
        return TINY, _tiny_configs()
    from tuner.models.base import check_base_spec

    fam = check_base_spec(base, prediction_type=prediction_type)
    path = Path(base).expanduser()
    return fam, (_folder_configs(path, fam) if path.is_dir() else _shipped_configs(fam))


def build_skeleton(base: str, family: str | None = None, prediction_type: str | None = None) -> Skeleton:
    """The components of ``base`` (or ``family``) on the meta device. Never allocates weights."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    fam, configs = component_configs(base, family, prediction_type)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoders = {}
        for spec in fam.text_encoders:
            cfg = {k: v for k, v in configs[spec.component].items() if not k.startswith("_")}
            cfg.pop("architectures", None)
            model_class = getattr(transformers, spec.model_class)
            encoders[spec.component] = model_class(transformers.CLIPTextConfig(**cfg))
    tokens = int(configs[fam.text_encoders[0].component].get("max_position_embeddings", 77))
    return Skeleton(family=fam, unet=unet, vae=vae, text_encoders=encoders, context_tokens=tokens)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def narrow_weights(module: nn.Module) -> tuple[int, int]:
    """(weights, output channels) of the layers in ``module`` that :func:`tuner.optim.memory.store_frozen`
    stores narrow when frozen (fp8 adds one fp32 scale per output channel)."""
    layers = [m for m in module.modules() if storable(m)]
    return sum(m.weight.numel() for m in layers), sum(m.weight.shape[0] for m in layers)


def largest_narrow_weight(module: nn.Module) -> int:
    """Elements of the largest weight :func:`narrow_weights` counts (0 when none)."""
    return max((m.weight.numel() for m in module.modules() if storable(m)), default=0)


def lora_tensor_sizes(model: nn.Module, plan: dict[str, tuple[int, float]]) -> list[int]:
    """Element counts of the ``lora_A``/``lora_B`` tensors peft creates for ``plan`` (path -> (rank,
    alpha)): Linear and 1x1 conv ``r*(in + out)``; a kxk conv ``r*in*k*k`` (down, kxk) + ``r*out`` (up, 1x1)."""
    modules = dict(model.named_modules())
    sizes = []
    for name, (rank, _alpha) in plan.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            kk = m.kernel_size[0] * m.kernel_size[1]
            sizes += [rank * m.in_channels // m.groups * kk, rank * m.out_channels]
        else:
            sizes += [rank * m.in_features, rank * m.out_features]
    return sizes
