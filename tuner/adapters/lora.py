"""LoRA/LoCon on live models: which modules to adapt, attaching trainable layers, reading them out,
merging files into weights.

Trainable layers are peft's (``inject_adapter_in_model``): kaiming-uniform ``lora_A`` (down) and zero
``lora_B`` (up), so a fresh adapter changes nothing. Our own code handles what peft does not: kohya's module
sets, canonical module keys for export, and exact merging of files from other tools.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tuner.adapters.lycoris import fit_problem, kind_of, weight_delta
from tuner.adapters.types import LoraModule, LoraWeights, split_key
from tuner.errors import FormatError

UNET_PRESETS = ("attention", "attention_ff_proj", "kohya", "locon")
_ATTN = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FF_PROJ = re.compile(r"(\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|\.attentions\.\d+\.proj_(in|out))$")
_TE = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_TRANSFORMER_CLASSES = ("Transformer2DModel",)
_LOCON_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def _inside(model: nn.Module, class_names: tuple[str, ...]) -> set[str]:
    """Names of Linear/Conv2d modules that sit inside a module of one of ``class_names``."""
    found: set[str] = set()
    for parent_name, parent in model.named_modules():
        if type(parent).__name__ in class_names:
            for child_name, child in parent.named_modules():
                if child_name and isinstance(child, (nn.Linear, nn.Conv2d)):
                    found.add(f"{parent_name}.{child_name}")
    return found


def unet_targets(unet: nn.Module, preset: str) -> list[str]:
    """Module paths of the UNet a preset adapts, in model order.

    ``attention``: attn1/attn2 ``to_q/to_k/to_v/to_out.0``. ``attention_ff_proj``: + ``ff.net.0.proj``,
    ``ff.net.2``, ``proj_in``/``proj_out``. ``kohya``: every Linear/Conv2d inside ``Transformer2DModel``
    (kohya's default; FORMATS.md §1.3). ``locon``: kohya + those inside ResNet and down/up-sampler blocks.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; choose from {', '.join(UNET_PRESETS)}")
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if preset == "attention":
        chosen = {n for n in names if _ATTN.search("." + n)}
    elif preset == "attention_ff_proj":
        chosen = {n for n in names if _ATTN.search("." + n) or _FF_PROJ.search("." + n)}
    else:
        chosen = _inside(unet, _TRANSFORMER_CLASSES)
        if preset == "locon":
            chosen |= _inside(unet, _LOCON_CLASSES)
    return [n for n in names if n in chosen]


def text_encoder_targets(text_encoder: nn.Module) -> list[str]:
    """q/k/v/out projections and MLP fc1/fc2 of every CLIP layer (kohya's text-encoder set)."""
    return [n for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear) and _TE.search(n)]


def canonical_path(component: str, live_path: str) -> str:
    """Live module path -> canonical path (text encoders always carry ``text_model.``, FORMATS.md §1.2)."""
    if component.startswith("text_encoder") and not live_path.startswith("text_model."):
        return "text_model." + live_path
    return live_path


def live_path(component: str, path: str, model: nn.Module) -> str:
    """Canonical path -> the path in ``model`` (transformers >= 5 ``CLIPTextModel`` has no ``text_model``)."""
    if component.startswith("text_encoder") and path.startswith("text_model.") and not hasattr(model, "text_model"):
        return path[len("text_model.") :]
    return path


def plan_ranks(
    model: nn.Module,
    targets: Iterable[str],
    *,
    rank: int,
    alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, alpha). 3x3 convs get ``conv_rank/conv_alpha`` when given; Linear and 1x1 convs
    get ``rank/alpha`` (kohya's LoCon convention)."""
    modules = dict(model.named_modules())
    plan = {}
    for name in targets:
        m = modules[name]
        is_kxk = isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        if is_kxk and conv_rank is not None:
            plan[name] = (conv_rank, conv_alpha if conv_alpha is not None else float(conv_rank))
        else:
            plan[name] = (rank, alpha)
    return plan


def attach_lora(
    model: nn.Module,
    plan: Mapping[str, tuple[int, float]],
    *,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap the modules of ``plan`` (path -> (rank, alpha)) in peft LoRA layers, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if not plan:
        raise ValueError("no modules to adapt")
    ranks = [r for r, _ in plan.values()]
    alphas = [a for _, a in plan.values()]
    base_rank = max(set(ranks), key=ranks.count)
    base_alpha = max(set(alphas), key=alphas.count)
    config = LoraConfig(
        r=base_rank,
        lora_alpha=base_alpha,
        lora_dropout=dropout,
        target_modules=list(plan),
        rank_pattern={f"^{re.escape(n)}$": r for n, (r, _) in plan.items() if r != base_rank},
        alpha_pattern={f"^{re.escape(n)}$": a for n, (_, a) in plan.items() if a != base_alpha},
        init_lora_weights=True,
    )
    with warnings.catch_warnings():  # a second adapter in one model is intended (several files, unmerged)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return model


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """Live path -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def extract_lora(component: str, model: nn.Module, adapter_name: str = "default") -> dict[str, LoraModule]:
    """Read trained factors out of ``model`` as canonical key -> :class:`LoraModule` (detached copies)."""
    out: dict[str, LoraModule] = {}
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        r = layer.r[adapter_name]
        out[f"{component}:{canonical_path(component, name)}"] = LoraModule(
            down=layer.lora_A[adapter_name].weight.detach().float().cpu().clone(),
            up=layer.lora_B[adapter_name].weight.detach().float().cpu().clone(),
            alpha=float(layer.scaling[adapter_name] * r),
        )
    return out


def trainable_state(models: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """All trainable tensors as ``"<component>.<param name>"`` -> tensor (checkpoints)."""
    return {
        f"{c}.{n}": p.detach().cpu().clone()
        for c, m in models.items()
        for n, p in m.named_parameters()
        if p.requires_grad
    }


def candidate_keys(models: Mapping[str, nn.Module]) -> list[str]:
    """Canonical keys of every Linear/Conv2d in ``models`` (what a file's module names may refer to)."""
    keys = []
    for component, model in models.items():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and ".lora_" not in name:
                name = name.removesuffix(".base_layer")  # a layer already wrapped by peft
                keys.append(f"{component}:{canonical_path(component, name)}")
    return keys


def resolve_module(models: Mapping[str, nn.Module], key: str) -> nn.Module:
    component, path = split_key(key)
    if component not in models:
        raise FormatError(f"the adapter has modules for '{component}', which this base model does not have")
    model = models[component]
    try:
        module = model.get_submodule(live_path(component, path, model))
    except AttributeError:
        raise FormatError(f"the adapter targets '{key}', which this base model does not have") from None
    return getattr(module, "base_layer", module)


def check_shapes(models: Mapping[str, nn.Module], weights: LoraWeights, family_name: str) -> None:
    """Refuse a LoRA whose factor shapes do not fit the base (made for another family), listing a few."""
    bad = []
    for key, mod in weights.modules.items():
        w = resolve_module(models, key).weight
        problem = fit_problem(mod, w.shape)
        if problem is not None:
            bad.append(f"{key}: {problem}")
    if bad:
        from tuner.formats.detect import detect_family

        shapes = {k: tuple(m.down.shape) for k, m in weights.modules.items() if isinstance(m, LoraModule)}
        made_for = detect_family(weights.metadata, shapes) or weights.metadata.get("ss_base_model_version", "unknown")
        raise FormatError(
            f"the LoRA does not fit this base model ({family_name}); it was made for '{made_for}'. "
            f"{len(bad)} module(s) differ in shape, e.g.:\n  " + "\n  ".join(bad[:5])
        )


@torch.no_grad()
def merge_lora(models: Mapping[str, nn.Module], weights: LoraWeights, multiplier: float = 1.0) -> int:
    """Add ``multiplier * alpha/r * up @ down`` to each targeted weight, in place (LoHa/LoKr/DoRA modules:
    their deltas, :func:`tuner.adapters.lycoris.weight_delta`). Returns modules merged."""
    for key, mod in weights.modules.items():
        layer = resolve_module(models, key)
        delta = weight_delta(mod, layer.weight, multiplier)
        layer.weight.add_(delta.to(layer.weight.dtype, copy=False).to(layer.weight.device))
    return len(weights.modules)


def attach_lora_file(
    models: Mapping[str, nn.Module], weights: LoraWeights, adapter_name: str, multiplier: float = 1.0
) -> None:
    """Attach a loaded LoRA as separate (unmerged) peft layers with its exact per-module ranks and scales.
    Several files can be attached under different ``adapter_name``s; all stay active. LoHa/LoKr/DoRA
    modules have no peft LoRA layer: a :class:`FormatError` says to merge them instead."""
    others = sorted({kind_of(m) for m in weights.modules.values() if not isinstance(m, LoraModule)})
    if others:
        raise FormatError(
            f"{', '.join(others)} modules can only be merged into the weights, not attached as separate "
            "LoRA layers: drop --no-merge"
        )
    by_component: dict[str, dict[str, LoraModule]] = {}
    for key, mod in weights.modules.items():
        component, path = split_key(key)
        by_component.setdefault(component, {})[live_path(component, path, models[component])] = mod
    for component, mods in by_component.items():
        model = models[component]
        attach_lora(model, {p: (m.rank, m.alpha) for p, m in mods.items()}, adapter_name=adapter_name)
        layers = lora_layers(model)
        with torch.no_grad():
            for path, mod in mods.items():
                layer = layers[path]
                for factor, value in ((layer.lora_A[adapter_name], mod.down), (layer.lora_B[adapter_name], mod.up)):
                    factor.weight.copy_(value.reshape(factor.weight.shape).to(factor.weight.dtype))
                    factor.weight.requires_grad_(False)
                layer.scaling[adapter_name] = mod.scale * multiplier
        for layer in layers.values():
            layer.set_adapter(sorted(layer.lora_A.keys()))
