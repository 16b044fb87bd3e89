"""kohya / A1111 LoRA state dicts (FORMATS.md §1): module naming, export and import.

A kohya file holds, per adapted layer ``<NAME>``, ``<NAME>.lora_down.weight``, ``<NAME>.lora_up.weight``
and a 0-dim ``<NAME>.alpha``; ``<NAME>`` is ``<prefix>_<module path with . -> _>``. The flattening loses
the dots, so reading resolves names through a *name table* built from the canonical keys of the model the
file is meant for (:func:`kohya_name_table`), never by guessing where the dots were.

SDXL UNet modules are written with LDM-derived names (``lora_unet_input_blocks_4_1_...``), as kohya does.
Accepted on read, besides the names tuner writes (aliases, see :func:`kohya_aliases`): LDM-derived UNet
names for SD1/SD2 (``lora_unet_input_blocks_1_1_...``, which A1111 and ComfyUI accept), diffusers-derived
UNet names for SDXL, ``lora_te1_`` for a
single text encoder (what diffusers' own kohya exporter writes) and text-encoder names without the
``text_model`` level (kohya run under transformers 5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from tuner.adapters.types import LoraModule, LoraWeights, split_key
from tuner.errors import FormatError
from tuner.formats.common import listing
from tuner.formats.ldm import LDM_LAYOUTS, to_ldm_path
from tuner.models.families import Family

# Tensor suffixes of one module -> field of LoraModule.
PARTS: dict[str, str] = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

# Every prefix a kohya-style key may start with (SD1/SD2 single encoder, SDXL's two).
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def kohya_module_name(family: Family, canonical_key: str) -> str:
    """The kohya module name of a canonical key, the way kohya itself writes it for ``family``.

    ``unet:down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``;
    ``text_encoder:text_model.encoder.layers.0.self_attn.q_proj`` ->
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.
    """
    component, path = _split(canonical_key)
    prefix = _prefix(family, component, canonical_key)
    if component == "unet":
        path = _unet_path(family, path)
    return f"{prefix}_{path.replace('.', '_')}"


def _unet_path(family: Family, path: str) -> str:
    """The UNet module path kohya flattens for ``family`` (diffusers tree, or LDM tree for SDXL)."""
    if family.unet_naming == "diffusers":
        return path
    if family.unet_naming == "ldm":
        layout = LDM_LAYOUTS.get(family.name)
        if layout is None:
            raise ValueError(f"family {family.name!r} names UNet modules after the LDM tree but has no LDM layout")
        try:
            return to_ldm_path(layout, path)
        except ValueError as exc:
            raise FormatError(f"unet:{path}: {exc}") from None
    raise ValueError(f"family {family.name!r} has unknown unet_naming {family.unet_naming!r}")


def kohya_aliases(family: Family, canonical_key: str) -> list[str]:
    """Other kohya names other writers use for the same module (accepted on read, never written).

    * UNet, families with a known LDM layout and diffusers naming: the LDM-derived name.
    * UNet, families with LDM naming (SDXL): the diffusers-derived name.
    * Single-text-encoder families: ``lora_te1_`` instead of ``lora_te_``.
    * Text encoders: the name without the ``text_model`` level.
    """
    component, path = _split(canonical_key)
    prefix = _prefix(family, component, canonical_key)
    aliases: list[str] = []
    if component == "unet":
        layout = LDM_LAYOUTS.get(family.name)
        if family.unet_naming == "diffusers" and layout is not None:
            try:
                aliases.append(f"{prefix}_{to_ldm_path(layout, path).replace('.', '_')}")
            except ValueError:
                pass  # a module outside the mapped blocks has no LDM name; only its diffusers name is valid
        elif family.unet_naming == "ldm":
            aliases.append(f"{prefix}_{path.replace('.', '_')}")  # diffusers-derived (diffusers' own exporter)
        return aliases
    prefixes = [prefix]
    if len(family.text_encoders) == 1 and prefix == "lora_te":
        prefixes.append("lora_te1")
    paths = [path]
    if path.startswith("text_model."):
        paths.append(path[len("text_model.") :])
    for p in prefixes:
        for q in paths:
            name = f"{p}_{q.replace('.', '_')}"
            if (p, q) != (prefix, path):
                aliases.append(name)
    return aliases


def kohya_name_table(
    family: Family, canonical_keys: Iterable[str], *, aliases: bool = True
) -> dict[str, str]:
    """kohya module name -> canonical key for the given modules (plus :func:`kohya_aliases` if ``aliases``).

    Raises :class:`FormatError` when two canonical keys would share a kohya name.
    """
    keys = list(canonical_keys)
    table: dict[str, str] = {}

    def add(name: str, key: str) -> None:
        other = table.setdefault(name, key)
        if other != key:
            raise FormatError(f"kohya name {name!r} would stand for both {other!r} and {key!r}")

    for key in keys:
        add(kohya_module_name(family, key), key)
    if aliases:
        for key in keys:
            for name in kohya_aliases(family, key):
                add(name, key)
    return table


def to_kohya_state_dict(
    weights: LoraWeights, family: Family, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """kohya tensors for ``weights``: ``lora_down.weight``, ``lora_up.weight`` and a 0-dim ``alpha`` per module.

    Every tensor, alpha included, is cast to ``dtype`` (as kohya's ``--save_precision`` does). Raises
    ``ValueError`` for an alpha that is not a positive finite number or that is 0 or inf in ``dtype``, and
    for factors whose ranks disagree; :class:`FormatError` if two modules share a kohya name.
    """
    state: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for key, module in weights.modules.items():
        name = kohya_module_name(family, key)
        if name in owners:
            raise FormatError(f"kohya name {name!r} would stand for both {owners[name]!r} and {key!r}")
        owners[name] = key
        _check_factors(key, module)
        alpha = torch.tensor(float(module.alpha), dtype=dtype)
        if not (math.isfinite(module.alpha) and module.alpha > 0 and 0 < float(alpha) < math.inf):
            raise ValueError(
                f"{key}: alpha must be a positive number (loaders compute scale = alpha / rank, and 0 would "
                f"disable the module), got {module.alpha!r} ({float(alpha)!r} in {dtype})"
            )
        state[f"{name}.lora_down.weight"] = module.down.detach().to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = module.up.detach().to(dtype).contiguous()
        state[f"{name}.alpha"] = alpha
    return state


def from_kohya_state_dict(
    sd: Mapping[str, torch.Tensor], name_table: Mapping[str, str], *, lenient: bool = False
) -> tuple[LoraWeights, list[str]]:
    """Read kohya tensors into :class:`LoraWeights` (empty metadata) and the list of ignored keys.

    ``name_table`` maps kohya names to canonical keys (:func:`kohya_name_table` for the target model).
    A module without ``alpha`` gets ``alpha = rank`` (scale 1, like every loader); ``alpha == 0`` also means
    rank, as in kohya. Keys that are not ``lora_down.weight``/``lora_up.weight``/``alpha`` of a known
    module, and modules missing a factor, are problems: all are reported in one :class:`FormatError`,
    unless ``lenient``, in which case their keys are skipped and returned as the second value.
    Factor tensors keep the file's dtype.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    ignored: list[str] = []
    for key in sorted(sd):
        module_name, _, part = key.partition(".")
        if part not in PARTS or module_name not in name_table:
            ignored.append(key)
            why = "not a module of this model" if part in PARTS else "not a lora_down/lora_up/alpha tensor"
            problems.append(f"{key} ({why})")
            continue
        groups.setdefault(module_name, {})[PARTS[part]] = sd[key]

    modules: dict[str, LoraModule] = {}
    seen_as: dict[str, str] = {}
    for module_name, parts in groups.items():
        canonical = name_table[module_name]
        missing = [p for p in ("down", "up") if p not in parts]
        problem = None
        if missing:
            problem = f"{module_name}: missing {' and '.join(f'lora_{p}.weight' for p in missing)}"
        elif canonical in seen_as:
            problem = f"{module_name}: same module as {seen_as[canonical]} (both name {canonical})"
        if problem is not None:
            problems.append(problem)
            ignored.extend(f"{module_name}.{suffix}" for suffix, field in PARTS.items() if field in parts)
            continue
        seen_as[canonical] = module_name
        down, up = parts["down"], parts["up"]
        if down.shape[0] != up.shape[1]:
            raise FormatError(
                f"{module_name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} disagree on the rank"
            )
        rank = int(down.shape[0])
        alpha = _read_alpha(module_name, parts.get("alpha"), rank)
        modules[canonical] = LoraModule(down=down, up=up, alpha=alpha)

    if problems and not lenient:
        raise FormatError(
            listing(
                f"{len(problems)} problem(s) reading a kohya LoRA ({len(modules)} modules understood); "
                "the file may be for another model family or hold LyCORIS/DoRA/embedding tensors "
                "(lenient=True skips them)",
                problems,
            )
        )
    return LoraWeights(modules=modules), ignored


def _read_alpha(module_name: str, tensor: torch.Tensor | None, rank: int) -> float:
    if tensor is None:
        return float(rank)
    if tensor.numel() != 1:
        raise FormatError(f"{module_name}.alpha: expected a scalar, got shape {tuple(tensor.shape)}")
    alpha = float(tensor.reshape(()).item())
    if not math.isfinite(alpha):
        raise FormatError(f"{module_name}.alpha is {alpha}")
    return float(rank) if alpha == 0 else alpha


def _check_factors(key: str, module: LoraModule) -> None:
    down, up = module.down, module.up
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise ValueError(f"{key}: factors do not fit: down {tuple(down.shape)}, up {tuple(up.shape)}")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"{key}: a conv lora_up must be 1x1, got {tuple(up.shape)}")


def _split(canonical_key: str) -> tuple[str, str]:
    try:
        return split_key(canonical_key)
    except ValueError as exc:
        raise FormatError(str(exc)) from None


def _prefix(family: Family, component: str, canonical_key: str) -> str:
    prefixes = family.kohya_prefixes
    if component not in prefixes:
        raise FormatError(
            f"{canonical_key}: family {family.name!r} has no {component} (components: {', '.join(prefixes)})"
        )
    return prefixes[component]
