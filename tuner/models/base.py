"""Loading a base model: the embedded ``tiny`` base, a local diffusers folder or a single-file checkpoint
(:mod:`tuner.models.single_file`). Never a hub.

A :class:`BaseModel` holds the components as separate modules (UNet, VAE, text encoder, tokenizer) plus the
noise-scheduler config; trainers adapt whichever parts they need and the sampler runs them.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.models.families import SD2, SD2V, SD15, SDXL, TINY, Family

DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class BaseModel:
    """A loaded base model.

    ``vae_scale_factor``: pixels per latent cell (8 for SD, 4 for tiny). ``latent_scale``: the VAE's
    ``scaling_factor``; the UNet sees ``latent_dist.sample() * latent_scale``. ``text_encoder_2`` and
    ``tokenizer_2`` are set for families with a second text encoder (SDXL); which encoders exist and how
    their outputs are used is the family record's business (:attr:`text_encoders`, ``family.text_encoders``).
    """

    family: Family
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str
    is_random: bool = False
    notes: list[str] = field(default_factory=list)
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> dict[str, Any]:
        """Component name -> text encoder, in the family's order (``text_encoder``, ``text_encoder_2``)."""
        return {spec.component: getattr(self, spec.component) for spec in self.family.text_encoders}

    @property
    def tokenizers(self) -> dict[str, Any]:
        """Tokenizer name -> tokenizer, in the family's order."""
        return {spec.tokenizer: getattr(self, spec.tokenizer) for spec in self.family.text_encoders}

    @property
    def components(self) -> dict[str, Any]:
        """Every model component (UNet, VAE, text encoders) by its diffusers name."""
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}

    def to(self, device: torch.device | str) -> BaseModel:
        for module in self.components.values():
            module.to(device)
        return self

    def fingerprint(self) -> str:
        """12 hex digits that tell two bases' weights apart (a sha256 over the UNet's first and last conv, the
        first text encoder's token table and the VAE decoder's last conv; under a second for SD-size models).
        Written into the images tuner draws for caches (class images), so a cache drawn by another base is
        recognised. Not a file hash: the same weights loaded from a folder or a single file agree."""
        import hashlib

        digest = hashlib.sha256()
        tensors = (self.unet.conv_in.weight, self.unet.conv_out.weight,
                   self.text_encoder.get_input_embeddings().weight, self.vae.decoder.conv_out.weight)
        for t in tensors:
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and " " not in spec


def load_base(spec: str, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None) -> BaseModel:
    """Load ``tiny``, a local diffusers folder (SD1.x/SD2.x/SDXL layout) or a single-file checkpoint, on the CPU.

    Raises :class:`TunerError` within seconds for a hub id, a missing path, an unknown or unsafe file or a
    folder missing a component, saying what to pass instead. ``prediction_type`` (``"epsilon"``/``"v"``)
    says what an SD2.x single file predicts (its weights cannot tell).
    """
    if spec == "tiny":
        return _load_tiny(dtype)
    path = Path(spec).expanduser()
    family = check_base_spec(spec, prediction_type=prediction_type)
    if path.is_file():
        return _load_single_file(path, family, dtype)
    return _load_diffusers_folder(path, family, dtype)


def _load_single_file(path: Path, family: Family, dtype: torch.dtype) -> BaseModel:
    from tuner.models.single_file import components_from_ldm, read_checkpoint

    tensors, _ = read_checkpoint(path)
    loaded = components_from_ldm(family, tensors, source=f"'{path}'", dtype=dtype)
    return BaseModel(
        family=family,
        unet=loaded.modules["unet"],
        vae=loaded.modules["vae"],
        scheduler_config=loaded.scheduler_config,
        source=str(path),
        **_encoders_by_field(family, loaded.modules, loaded.tokenizers),
    )


def _encoders_by_field(family: Family, modules: dict[str, Any], tokenizers: dict[str, Any]) -> dict[str, Any]:
    """BaseModel keyword arguments for the family's text encoders and tokenizers."""
    out: dict[str, Any] = {}
    for spec in family.text_encoders:
        out[spec.component] = modules[spec.component]
        out[spec.tokenizer] = tokenizers[spec.tokenizer]
    return out


def check_base_spec(spec: str, *, prediction_type: str | None = None) -> Family:
    """What :func:`load_base` checks before loading any weight (it reads only JSON configs, or a
    ``.safetensors`` header): the family of ``spec``, or a :class:`TunerError` saying what to pass instead
    (``tuner validate`` uses it)."""
    if spec == "tiny":
        return TINY
    path = Path(spec).expanduser()
    if not path.exists():
        hint = (
            f"'{spec}' looks like a model hub id, but tuner never downloads anything. Download it on a "
            f"machine with access (e.g. `huggingface-cli download {spec} --local-dir DIR`) and pass "
            "--base DIR, or use --base tiny (the embedded base)."
            if _looks_like_hub_id(spec)
            else f"base model path '{spec}' does not exist. Pass --base tiny (the embedded base), the path "
            "of a local diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a "
            "single-file checkpoint (.safetensors)."
        )
        raise TunerError(hint)
    if path.is_file():
        from tuner.models.single_file import check_single_file

        return check_single_file(path, prediction_type=prediction_type)
    missing = [c for c in DIFFUSERS_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise TunerError(
            f"'{path}' is not a diffusers model folder: missing {', '.join(m + '/' for m in missing)}. "
            "Expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (plus text_encoder_2/ and "
            "tokenizer_2/ for SDXL), as written by the diffusers pipelines' save_pretrained or `tuner export-base`."
        )
    unet_cfg = _read_json(path / "unet" / "config.json")
    cross_dim = unet_cfg.get("cross_attention_dim")
    if unet_cfg.get("addition_embed_type") == "text_time":
        family = SDXL
    elif cross_dim == 1024:
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
        family = SD2V if sched.get("prediction_type") == "v_prediction" else SD2
    else:
        family = {768: SD15, TINY.cross_attention_dim: TINY}.get(cross_dim)  # type: ignore[assignment]
    if family is None:
        family = _family_by_topology(path, unet_cfg)
    if family is None:
        raise TunerError(
            f"'{path}': unet cross_attention_dim {cross_dim!r} matches no known family "
            "(768 = SD1.x, 1024 = SD2.x, 128 = tuner tiny; SDXL has addition_embed_type 'text_time'), and its "
            "block layout and text-encoder depth are neither SD1.x's nor SD2.x's."
        )
    extra = [n for te in family.text_encoders for n in (te.component, te.tokenizer) if not (path / n).is_dir()]
    if extra:
        raise TunerError(f"'{path}' is an {family.description} folder but lacks "
                         f"{', '.join(m + '/' for m in extra)}")
    return family


# What makes an SD1.x or SD2.x folder, whatever its widths: the UNet's block layout and the text encoder's depth
UNET_TOPOLOGY = ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection")


def _family_by_topology(path: Path, unet_cfg: dict[str, Any]) -> Family | None:
    """SD1.x or SD2.x (by the scheduler's prediction type) when the folder has that family's block topology
    at other widths, as the small models of :mod:`tuner.models.small` do (kohya names, and so every file
    tuner writes, depend on the topology only). None when neither matches."""
    from tuner.models.single_file import family_config

    if not (path / "text_encoder" / "config.json").is_file():
        return None
    layers = _read_json(path / "text_encoder" / "config.json").get("num_hidden_layers")
    for family in (SD15, SD2):
        reference = family_config(family, "unet")
        if layers == family_config(family, "text_encoder").get("num_hidden_layers") and all(
            unet_cfg.get(key, False) == reference.get(key, False) for key in UNET_TOPOLOGY
        ):
            if family is SD2:
                sched = _read_json(path / "scheduler" / "scheduler_config.json")
                return SD2V if sched.get("prediction_type") == "v_prediction" else SD2
            return family
    return None


TINY_ASSETS = Path(__file__).resolve().parent.parent / "tiny" / "assets"


def _load_tiny(dtype: torch.dtype) -> BaseModel:
    """The pretrained tiny base shipped in ``tuner/tiny/assets`` (a diffusers folder), or, in a checkout
    that does not have those weights yet, the random stand-in built from config (announced in ``notes``)."""
    if (TINY_ASSETS / "model_index.json").exists():
        base = _load_diffusers_folder(TINY_ASSETS, TINY, dtype)
        base.source = "tiny"
        return base
    from tuner.models.tiny import build_tiny_components

    parts = build_tiny_components()
    return BaseModel(
        family=TINY,
        unet=_cast(parts["unet"], dtype),
        vae=_cast(parts["vae"], dtype),
        text_encoder=_cast(parts["text_encoder"], dtype),
        tokenizer=parts["tokenizer"],
        scheduler_config=parts["scheduler_config"],
        source="tiny",
        is_random=True,
        notes=["the embedded tiny base is RANDOMLY INITIALISED (a stand-in until the pretrained one lands): "
               "images will be noise-like; this shows the workflow, not quality"],
    )


def _load_diffusers_folder(path: Path, family: Family, dtype: torch.dtype) -> BaseModel:
    """Load a folder that :func:`check_base_spec` accepted as ``family`` (its text encoders and tokenizers
    are those the family record lists)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    modules: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    try:
        kw: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
        for spec in family.text_encoders:
            model_class = getattr(transformers, spec.model_class)
            modules[spec.component] = model_class.from_pretrained(path / spec.component, **kw).eval()
            tokenizers[spec.tokenizer] = CLIPTokenizer.from_pretrained(path / spec.tokenizer, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TunerError(f"could not load the diffusers folder '{path}': {exc}") from exc
    sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    return BaseModel(
        family=family,
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=sched_cfg,
        source=str(path),
        **_encoders_by_field(family, modules, tokenizers),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunerError(f"missing file '{path}' in the diffusers folder") from None
    except json.JSONDecodeError as exc:
        raise TunerError(f"'{path}' is not valid JSON: {exc}") from None


def export_base(base: BaseModel, out_dir: str | Path) -> Path:
    """Write ``base`` as a standard diffusers folder that its family's pipeline (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``) loads with ``from_pretrained``.

    Written into a temporary sibling folder and renamed into place, so a crash never leaves a half folder.
    An existing non-empty ``out_dir`` is refused rather than overwritten.
    """
    import diffusers

    from tuner.formats.io import fsync_tree

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TunerError(f"output folder '{out}' exists and is not empty; pass a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class = getattr(diffusers, base.family.pipeline_class)
    parts: dict[str, Any] = {**base.components, **base.tokenizers}
    unused = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    accepted = inspect.signature(pipeline_class.__init__).parameters
    parts.update({k: v for k, v in unused.items() if k in accepted})  # SD1's pipeline asks for these
    pipe = pipeline_class(scheduler=diffusers.DDIMScheduler.from_config(base.scheduler_config), **parts)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        fsync_tree(tmp)  # the files are on disk before the folder gets its final name
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _cast(module: Any, dtype: torch.dtype) -> Any:
    return module if dtype == torch.float32 else module.to(dtype)
