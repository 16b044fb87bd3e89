"""Single-file checkpoints (the original LDM layout A1111, ComfyUI and sharing sites use): detect the family,
read safely, load offline, write.

Reading never runs code from a file: ``.safetensors`` holds only tensors, and pickle-based files
(``.ckpt``/``.pt``/``.pth``/``.bin``) are read with ``torch.load(weights_only=True)`` only.
:func:`convert_checkpoint` (``tuner convert-checkpoint``) also reads PyTorch Lightning checkpoints whose extra
objects (callbacks, hyper-parameters) ``weights_only`` refuses: every class or function such a file names
becomes an inert placeholder that is then dropped, so nothing from the file runs either.

Loading needs no hub: each family's component configs and the CLIP tokenizer files ship in
``tuner/models/configs`` (``Family.configs``). Widths, layer counts and latent channels are read from the
tensor shapes, so a file of the family's topology at other widths loads too; attention heads follow the
family's rule (SD1: 8 per UNet block; SD2/SDXL UNets and every text encoder: 64 channels per head), which
gives the real models' head counts at full size. The LDM -> diffusers renaming is diffusers' own
(``diffusers.loaders.single_file_utils``); writing uses tuner's tables in :mod:`tuner.formats.ldm_checkpoint`.
"""

from __future__ import annotations

import copy
import gzip
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tuner.errors import FormatError, TunerError
from tuner.formats.io import read_header, read_safetensors, save_safetensors
from tuner.formats.ldm import LDM_LAYOUTS
from tuner.formats.ldm_checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    canonical_clip_keys,
    clip_to_ldm,
    openclip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from tuner.models.families import FAMILIES, SD2, SD2V, SD15, SDXL, Family, TextEncoderSpec

CONFIGS = Path(__file__).resolve().parent / "configs"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

Shapes = dict[str, tuple[int, ...]]

# Keys that identify each part of a single file (what the error for an unknown file lists).
UNET_PROBE = UNET_PREFIX + "input_blocks.0.0.weight"
VAE_PROBE = VAE_PREFIX + "encoder.conv_in.weight"
TEXT_PROBES: dict[str, str] = {
    "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sd15": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
}

PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def is_single_file(path: str | Path) -> bool:
    """Whether ``path`` names a file tuner would read as a single-file checkpoint (by suffix)."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


# --------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a single-file checkpoint. ``.safetensors`` is read directly; pickle files
    only with ``torch.load(weights_only=True)`` (a file that needs more is refused, unread, with the
    conversion command to run). A ``state_dict`` entry is unwrapped; entries that are not tensors are dropped."""
    p = Path(path)
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            return read_safetensors(p)
        except FormatError as exc:
            raise TunerError(str(exc)) from None
    if p.suffix.lower() not in PICKLE_SUFFIXES:
        raise TunerError(
            f"'{p}': unknown checkpoint type {p.suffix!r}; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=_is_zip(p))
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as exc:
        raise TunerError(
            f"'{p}' cannot be read safely: torch.load(weights_only=True) refused it ({_first_line(exc)}). "
            "tuner never unpickles arbitrary objects, since a pickle can run code. If the file is an ordinary "
            f"(e.g. PyTorch Lightning) checkpoint, convert it once with `tuner convert-checkpoint {p} --out "
            f"{p.with_suffix('.safetensors')}` (it reads only tensors and replaces other objects with inert "
            "placeholders) and pass the .safetensors file."
        ) from None
    except OSError as exc:
        raise TunerError(f"'{p}': cannot read file: {exc}") from None
    tensors, _dropped = _tensors_of(obj, p)
    return tensors, {}


def read_shapes(path: str | Path) -> tuple[Shapes, dict[str, str]]:
    """``({key: shape}, metadata)``; for ``.safetensors`` from the header alone (no tensor data is read)."""
    p = Path(path)
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            metadata, entries = read_header(p)
        except FormatError as exc:
            raise TunerError(str(exc)) from None
        return {k: shape for k, (_, shape) in entries.items()}, metadata
    tensors, metadata = read_checkpoint(p)
    return {k: tuple(t.shape) for k, t in tensors.items()}, metadata


def _is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _tensors_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a loaded checkpoint object (unwrapping ``state_dict``), and the names of the dropped
    non-tensor entries."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        dropped = [f"{k} ({type(v).__name__})" for k, v in obj.items() if k != "state_dict"]
        obj = obj["state_dict"]
    else:
        dropped = []
    if not isinstance(obj, Mapping):
        raise TunerError(f"'{path}' holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    tensors = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            dropped.append(f"{key} ({type(value).__name__})")
    return tensors, dropped


# ------------------------------------------------------------------------------------------ detection


def detect_family(
    shapes: Shapes, metadata: Mapping[str, str], *, prediction_type: str | None = None, source: str = "file"
) -> Family:
    """The family of a single file from its keys (and, for SD2, how it predicts).

    Looked for, in order: a UNet (``model.diffusion_model.input_blocks.0.0.weight``) and a VAE
    (``first_stage_model.encoder.conv_in.weight``), then the text encoder: OpenCLIP bigG under
    ``conditioner.embedders.1.model.`` = SDXL, OpenCLIP under ``cond_stage_model.model.`` = SD2.x, CLIP under
    ``cond_stage_model.transformer.text_model.`` = SD1.x. SD2 512 (epsilon) and 768-v have identical weights:
    ``prediction_type`` (``"epsilon"``/``"v"``) decides, or else the ``tuner`` metadata block tuner writes
    into its own files; a ``modelspec.prediction_type`` or a file name is not trusted for it.
    """
    missing = [probe for probe in (UNET_PROBE, VAE_PROBE) if probe not in shapes]
    text = next((name for name, probe in TEXT_PROBES.items() if probe in shapes), None)
    if missing or text is None:
        looked = [UNET_PROBE, VAE_PROBE] + [f"{p} ({n})" for n, p in TEXT_PROBES.items()]
        found = ", ".join(missing) + (" and any text encoder" if text is None else "")
        sample = ", ".join(list(shapes)[:5]) or "no tensors at all"
        hint = ""
        if any(k.startswith(("lora_", "lora_unet_")) or ".lora_" in k for k in shapes):
            hint = " It looks like a LoRA: pass it with --lora, not --base."
        elif any(k.startswith(("unet.", "down_blocks.", "text_model.")) for k in shapes):
            hint = " It has diffusers names: a diffusers model is a folder (pass the folder)."
        raise TunerError(
            f"{source} is not a Stable Diffusion single-file checkpoint tuner knows: missing {found}. Looked for "
            f"{'; '.join(looked)}. Its first keys: {sample}.{hint}"
        )
    unet_width = shapes[UNET_PROBE][0]
    if text == "sdxl":
        family = SDXL
    elif text == "sd15":
        family = SD15
    else:
        family = _sd2_variant(metadata, prediction_type, source)
    if prediction_type is not None and family is not SD2 and family is not SD2V:
        wanted = PREDICTION_TYPES.get(prediction_type.lower())
        if wanted != family.prediction_type:
            raise TunerError(
                f"{source} is a {family.description} model (UNet {unet_width} wide), which predicts "
                f"{family.prediction_type}; prediction type {prediction_type!r} applies to SD2.x files only"
            )
    return family


def _sd2_variant(metadata: Mapping[str, str], prediction_type: str | None, source: str) -> Family:
    if prediction_type is not None:
        kind = PREDICTION_TYPES.get(prediction_type.lower())
        if kind is None:
            raise TunerError(f"prediction type {prediction_type!r}: expected 'epsilon' or 'v'")
        return SD2V if kind == "v_prediction" else SD2
    try:
        block = json.loads(metadata.get("tuner", "{}"))
    except json.JSONDecodeError:
        block = {}
    name = block.get("family") if isinstance(block, dict) else None
    if name in (SD2.name, SD2V.name):
        return FAMILIES[name]
    said = metadata.get("modelspec.prediction_type")
    note = f" (its metadata says modelspec.prediction_type={said!r}, which tuner does not rely on)" if said else ""
    raise TunerError(
        f"{source} is an SD2.x model, and its weights cannot tell whether it is the 512 px epsilon model or the "
        f"768 px v-prediction model{note}. Say which: --prediction-type v (768-v, e.g. "
        "v2-1_768-ema-pruned) or --prediction-type epsilon (512 base); in a recipe, model.prediction_type."
    )


def check_single_file(path: str | Path, *, prediction_type: str | None = None) -> Family:
    """The family of the single file at ``path``, reading only its header (``.safetensors``)."""
    shapes, metadata = read_shapes(path)
    return detect_family(shapes, metadata, prediction_type=prediction_type, source=f"'{path}'")


# ------------------------------------------------------------------------------------- configs & loading


@cache
def _shipped_config(family_dir: str, component: str) -> dict[str, Any]:
    return json.loads((CONFIGS / family_dir / f"{component}.json").read_text(encoding="utf-8"))


def family_config(family: Family, component: str) -> dict[str, Any]:
    """A copy of the shipped config of ``component`` (``unet``, ``vae``, ``text_encoder``, ``scheduler``,
    ``tokenizer``, ...) for ``family``."""
    if family.configs is None:
        raise TunerError(f"family {family.name!r} has no single-file checkpoints (no shipped configs)")
    return copy.deepcopy(_shipped_config(family.configs, component))


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise TunerError(f"the checkpoint has no {key!r} (needed for the {what}); is the file complete?")
    return shapes[key]


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def unet_config(family: Family, shapes: Shapes) -> dict[str, Any]:
    """The family's UNet config with channels, cross-attention width, transformer depth and (SDXL) the
    added-conditioning widths read from the LDM tensors."""
    cfg = family_config(family, "unet")
    n = cfg["layers_per_block"] + 1
    p = UNET_PREFIX
    widths = [
        _need(shapes, f"{p}input_blocks.{1 + n * i}.0.out_layers.3.weight", "UNet widths")[0]
        for i in range(len(cfg["block_out_channels"]))
    ]
    cfg["block_out_channels"] = widths
    cfg["in_channels"] = _need(shapes, UNET_PROBE, "UNet")[1]
    cfg["out_channels"] = _need(shapes, f"{p}out.2.weight", "UNet")[0]
    to_k = next((s for k, s in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise TunerError("the checkpoint's UNet has no cross-attention (attn2.to_k) weights")
    cfg["cross_attention_dim"] = to_k[1]
    if isinstance(cfg["attention_head_dim"], list):  # SD2/SDXL: 64 channels per head
        cfg["attention_head_dim"] = [max(1, w // 64) for w in widths]
    if isinstance(cfg.get("transformer_layers_per_block"), list):
        depths = []
        for i, down in enumerate(cfg["down_block_types"]):
            pattern = rf"{re.escape(p)}input_blocks\.{1 + n * i}\.1\.transformer_blocks\.(\d+)\."
            depths.append(_count(shapes, pattern) if down.startswith("CrossAttn") else 1)
        cfg["transformer_layers_per_block"] = depths
    if cfg.get("addition_embed_type") == "text_time":
        add_in = _need(shapes, f"{p}label_emb.0.0.weight", "SDXL added conditioning")[1]
        pooled = _need(shapes, "conditioner.embedders.1.model.text_projection", "SDXL pooled embedding")[1]
        cfg["projection_class_embeddings_input_dim"] = add_in
        cfg["addition_time_embed_dim"] = (add_in - pooled) // 6  # 6 time ids: size, crop, target size
    return cfg


def vae_config(family: Family, shapes: Shapes) -> dict[str, Any]:
    cfg = family_config(family, "vae")
    p = VAE_PREFIX
    cfg["block_out_channels"] = [
        _need(shapes, f"{p}encoder.down.{i}.block.0.conv1.weight", "VAE widths")[0]
        for i in range(len(cfg["block_out_channels"]))
    ]
    cfg["latent_channels"] = _need(shapes, f"{p}post_quant_conv.weight", "VAE")[0]
    cfg["in_channels"] = _need(shapes, VAE_PROBE, "VAE")[1]
    cfg["out_channels"] = _need(shapes, f"{p}decoder.conv_out.weight", "VAE")[0]
    return cfg


def text_encoder_config(family: Family, spec: TextEncoderSpec, shapes: Shapes) -> dict[str, Any]:
    cfg = family_config(family, spec.component)
    p = spec.ldm_prefix
    if spec.ldm_format == "clip":
        t = p + "text_model."
        vocab, hidden = _need(shapes, f"{t}embeddings.token_embedding.weight", spec.component)
        positions = _need(shapes, f"{t}embeddings.position_embedding.weight", spec.component)[0]
        layers = _count(shapes, rf"{re.escape(t)}encoder\.layers\.(\d+)\.")
        intermediate = _need(shapes, f"{t}encoder.layers.0.mlp.fc1.weight", spec.component)[0]
    else:
        vocab, hidden = _need(shapes, f"{p}token_embedding.weight", spec.component)
        positions = _need(shapes, f"{p}positional_embedding", spec.component)[0]
        layers = _count(shapes, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.") - family.ldm_layers_dropped
        intermediate = _need(shapes, f"{p}transformer.resblocks.0.mlp.c_fc.weight", spec.component)[0]
        if spec.pooled:
            cfg["projection_dim"] = _need(shapes, f"{p}text_projection", spec.component)[1]
    cfg.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions, num_hidden_layers=layers,
               intermediate_size=intermediate, num_attention_heads=max(1, hidden // 64))
    return cfg


@cache
def _clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    folder = CONFIGS / "clip_tokenizer"
    vocab = json.loads(gzip.open(folder / "vocab.json.gz", "rt", encoding="utf-8").read())
    lines = gzip.open(folder / "merges.txt.gz", "rt", encoding="utf-8").read().split("\n")
    merges = tuple(tuple(line.split(" ")) for line in lines[1:] if line)
    return vocab, merges  # type: ignore[return-value]


def build_tokenizer(family: Family, component: str = "tokenizer") -> Any:
    """The CLIP tokenizer of ``family`` from the shipped BPE files (same vocabulary for every SD text
    encoder; the padding token and length come from the family's ``<component>.json``)."""
    from transformers import CLIPTokenizer

    cfg = family_config(family, component)
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=cfg["model_max_length"],
        bos_token=cfg["bos_token"], eos_token=cfg["eos_token"], unk_token=cfg["unk_token"],
        pad_token=cfg["pad_token"],
    )


def scheduler_config(family: Family) -> dict[str, Any]:
    return {k: v for k, v in family_config(family, "scheduler").items() if not k.startswith("_")}


@dataclass
class SingleFileModel:
    """The components of a loaded single file: ``modules`` maps component names (``unet``, ``vae``,
    ``text_encoder``, ``text_encoder_2``) to eval-mode modules, ``tokenizers`` likewise."""

    family: Family
    modules: dict[str, Any]
    tokenizers: dict[str, Any]
    scheduler_config: dict[str, Any]
    dropped: list[str] = field(default_factory=list)


def load_single_file(
    path: str | Path, *, prediction_type: str | None = None, dtype: torch.dtype = torch.float32
) -> SingleFileModel:
    """Load a single-file checkpoint offline: detect the family, build each component from the shipped
    config fitted to the tensor shapes, convert LDM names with diffusers' converters, and load strictly
    (a missing or unexpected key is a :class:`TunerError` naming it)."""
    p = Path(path)
    tensors, metadata = read_checkpoint(p)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    family = detect_family(shapes, metadata, prediction_type=prediction_type, source=f"'{p}'")
    return components_from_ldm(family, tensors, source=str(p), dtype=dtype)


def components_from_ldm(
    family: Family, tensors: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
    dtype: torch.dtype = torch.float32,
) -> SingleFileModel:
    """Build and fill the diffusers components of ``family`` from an LDM state dict."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    modules: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    ucfg = unet_config(family, shapes)
    unet = UNet2DConditionModel.from_config(ucfg)
    _fill(unet, convert_ldm_unet_checkpoint(dict(tensors), ucfg), "unet", source)
    modules["unet"] = unet
    vcfg = vae_config(family, shapes)
    vae = AutoencoderKL.from_config(vcfg)
    _fill(vae, convert_ldm_vae_checkpoint(dict(tensors), vcfg), "vae", source)
    modules["vae"] = vae
    for spec in family.text_encoders:
        tcfg = text_encoder_config(family, spec, shapes)
        cls = getattr(transformers, spec.model_class)
        model = cls(transformers.CLIPTextConfig(**{k: v for k, v in tcfg.items() if k != "architectures"}))
        own = {k: v for k, v in tensors.items() if k.startswith(spec.ldm_prefix)}
        if spec.ldm_format == "clip":
            state = convert_ldm_clip_checkpoint(own, remove_prefix=spec.ldm_prefix)
        else:
            dropped = tcfg["num_hidden_layers"]  # first index past the layers diffusers keeps
            own = {k: v for k, v in own.items()
                   if not k.startswith(f"{spec.ldm_prefix}transformer.resblocks.{dropped}.")}
            if not spec.pooled:
                own.pop(f"{spec.ldm_prefix}text_projection", None)
            own.pop(f"{spec.ldm_prefix}logit_scale", None)
            state = convert_open_clip_checkpoint(model, own, prefix=spec.ldm_prefix)
        if not hasattr(model, "text_model"):  # transformers >= 5 CLIPTextModel: no text_model level
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        _fill(model, state, spec.component, source)
        modules[spec.component] = model
        if tcfg["vocab_size"] != len(_clip_vocab()[0]):
            raise TunerError(
                f"{source}: {spec.component} has a vocabulary of {tcfg['vocab_size']} tokens; the CLIP tokenizer "
                f"tuner ships has {len(_clip_vocab()[0])}"
            )
        tokenizers[spec.tokenizer] = build_tokenizer(family, spec.tokenizer)
    for name, module in modules.items():
        modules[name] = (module if dtype == torch.float32 else module.to(dtype)).eval()
    return SingleFileModel(family, modules, tokenizers, scheduler_config(family))


def _fill(module: torch.nn.Module, state: Mapping[str, torch.Tensor], component: str, source: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise TunerError(f"{source}: the {component} weights do not fit the {component} they describe: "
                         f"{'; '.join(parts)}")
    module.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------------ writing


def to_ldm_state_dict(family: Family, modules: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The components (``unet``, ``vae``, text encoders; modules or state dicts) as one LDM state dict."""
    if family.configs is None or family.name not in LDM_LAYOUTS:
        raise TunerError(f"family {family.name!r} has no single-file (LDM) layout; write a diffusers folder")

    def state(name: str) -> dict[str, torch.Tensor]:
        obj = modules[name]
        return dict(obj.state_dict() if hasattr(obj, "state_dict") else obj)

    vae = modules["vae"]
    vae_cfg = vae.config if hasattr(vae, "config") else None
    levels = len(vae_cfg.block_out_channels) if vae_cfg else _vae_levels(state("vae"))
    layers = vae_cfg.layers_per_block if vae_cfg else 2
    out = unet_to_ldm(state("unet"), LDM_LAYOUTS[family.name])
    out.update(vae_to_ldm(state("vae"), levels=levels, layers_per_block=layers))
    for spec in family.text_encoders:
        te = state(spec.component)
        if spec.ldm_format == "clip":
            out.update(clip_to_ldm(canonical_clip_keys(te), spec.ldm_prefix))
        else:
            # SD2: the file has the layer and projection diffusers drops (identity parts, see openclip_to_ldm)
            out.update(openclip_to_ldm(te, spec.ldm_prefix, dropped_layers=family.ldm_layers_dropped,
                                       unused_projection=not spec.pooled))
    return out


def _vae_levels(state: Mapping[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))


def single_file_metadata(family: Family, *, title: str, prediction_type: str) -> dict[str, str]:
    """ModelSpec keys for a full checkpoint, plus the ``tuner`` block that records the exact family."""
    res = family.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "tuner": json.dumps({"version": 1, "family": family.name, "kind": "checkpoint"}),
    }


def save_single_file(
    path: str | Path, family: Family, modules: Mapping[str, Any], *, dtype: torch.dtype | None = torch.float16,
    prediction_type: str | None = None, metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``modules`` as one ``.safetensors`` in the LDM layout (atomic write). ``dtype`` None keeps
    each tensor's dtype."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise TunerError(f"'{p}': single-file checkpoints are written as .safetensors only")
    tensors = to_ldm_state_dict(family, modules)
    if dtype is not None:
        tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = single_file_metadata(family, title=p.stem, prediction_type=prediction_type or family.prediction_type)
    meta.update(metadata or {})
    p.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(p, tensors, meta)
    return p


# ------------------------------------------------------------------------------------------ conversion


# Modules a model checkpoint never needs; a pickle that names one is treated as hostile, not stubbed.
HOSTILE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib", "runpy",
    "pickle", "_pickle", "socket", "ctypes", "code", "codeop", "pty", "webbrowser", "marshal", "types",
    "operator", "functools", "io", "_io", "pathlib", "tempfile", "multiprocessing", "signal", "torch",
    "inspect", "platform", "asyncio", "threading", "urllib", "http", "requests", "eval", "exec",
})  # fmt: skip


class _Placeholder:
    """Stands in for a class or function a checkpoint names; accepts any arguments and state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


@dataclass
class ConvertReport:
    source: Path
    out: Path
    tensors: int
    dropped: list[str]
    placeholders: list[str]

    def format(self) -> str:
        lines = [f"wrote {self.out}: {self.tensors} tensors from {self.source}"]
        if self.placeholders:
            lines.append("read as inert placeholders (never run): " + ", ".join(self.placeholders))
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} non-tensor entries: " + ", ".join(self.dropped[:20])
                         + (" ..." if len(self.dropped) > 20 else ""))
        return "\n".join(lines)


def _load_with_placeholders(path: Path, limit: int = 64) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)``, retried with an inert placeholder registered for each global the
    file names that weights_only does not allow (the restricted unpickler then builds placeholders instead
    of the real objects). Globals from :data:`HOSTILE_MODULES` are refused."""
    names: list[str] = []
    allowed: list[tuple[type, str]] = []
    for _ in range(limit):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path)), names
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
            if found is None:
                raise TunerError(f"'{path}' cannot be converted safely: {_first_line(exc)}") from None
            full = found.group(1)
            root = full.split(".")[0]
            if root in HOSTILE_MODULES or "." not in full:
                raise TunerError(
                    f"refused '{path}': it names {full}, which no model checkpoint needs; the file is likely "
                    "crafted to run code when unpickled. Nothing from it was run."
                ) from None
            names.append(full)
            allowed.append((type(full.rsplit(".", 1)[1], (_Placeholder,), {}), full))
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise TunerError(f"'{path}' cannot be read as a PyTorch checkpoint: {_first_line(exc)}") from None
    raise TunerError(f"'{path}' names more than {limit} foreign classes; refusing to convert it")


def convert_checkpoint(src: str | Path, out: str | Path) -> ConvertReport:
    """Convert a pickle checkpoint (``.ckpt``/``.pt``/``.pth``/``.bin``) to ``.safetensors`` without running
    anything from it: tensors only (``state_dict`` unwrapped), other entries dropped and reported; written
    atomically."""
    s, o = Path(src), Path(out)
    if not s.is_file():
        raise TunerError(f"'{s}': file not found")
    if o.suffix.lower() != ".safetensors":
        raise TunerError(f"--out '{o}': the converted file must end in .safetensors")
    if s.suffix.lower() in SAFETENSORS_SUFFIXES:
        raise TunerError(f"'{s}' is already a .safetensors file")
    obj, placeholders = _load_with_placeholders(s)
    tensors, dropped = _tensors_of(obj, s)
    if not tensors:
        raise TunerError(f"'{s}' holds no tensors (entries: {', '.join(dropped[:10]) or 'none'})")
    o.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(o, tensors, {"tuner_converted_from": s.name})
    return ConvertReport(s, o, len(tensors), dropped, placeholders)
