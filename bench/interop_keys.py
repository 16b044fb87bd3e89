"""Do other tools' LoRA loaders recognise every key of the files tuner writes? (issue 6: zero keys dropped)

tuner writes LoRA/LoCon files (UNet + text encoders, rank 4) for the full-size SD1.5 and SDXL topologies,
through the same writer training uses (``tuner.formats.lorafile.save_lora``), and converts them with
``tuner convert`` to the diffusers and PEFT layouts. Each file is then handed to:

* **ComfyUI**: its key map (``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``) for its own
  SD15/SDXL model classes and CLIP models built on the meta device, ``comfy.lora_convert.convert_lora``,
  ``comfy.lora.load_lora`` (whose "lora key not loaded" warnings are counted), the check
  ``ModelPatcher.add_patches`` makes (the patched weight exists) and each patch's ``calculate_weight`` on
  the meta weight (shapes fit);
* **kohya sd-scripts**: ``networks.lora.create_network_from_weights`` with kohya's own UNet
  (``library.original_unet`` / ``library.sdxl_original_unet``) and CLIP text encoders on the meta device,
  ``apply_to``, then ``load_state_dict(strict=False)``: unexpected keys and shape mismatches are drops;
* **diffusers** (installed with tuner): ``StableDiffusion[XL]LoraLoaderMixin.lora_state_dict`` (its kohya
  conversion raises on keys it cannot rename), then ``load_lora_into_unet`` / ``load_lora_into_text_encoder``
  on meta-device models: a converted factor that did not become a LoRA parameter is a drop.

"total" counts the file's tensors, "dropped" the ones the loader did not use. For diffusers, alpha tensors
are folded into ``network_alphas`` by its converter, so its drops are counted on the factors.

Nothing of ComfyUI or sd-scripts is copied here or installed into the project: they are imported at run
time from checkouts you make beside it (both are under licences of their own, GPL-3.0 and Apache-2.0)::

    git clone https://github.com/comfyanonymous/ComfyUI /tmp/ComfyUI
    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
    pip install einops                       # both import it; tuner does not need it
    OMP_NUM_THREADS=1 python bench/interop_keys.py --comfyui /tmp/ComfyUI --sd-scripts /tmp/sd-scripts

Their other requirements (torchvision, opencv) are only imported by code this check does not run: where
they are missing, an inert placeholder module stands in for them (the output says which). kohya pins
transformers 4.x, whose ``CLIPTextModel`` has a ``text_model`` level that transformers 5 removed; under
transformers 5 the text encoder is wrapped so that kohya sees the module tree it was written for.
Exit status: 0 when no loader drops a key of a kohya-format file and diffusers drops none of an export,
1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.adapters.lora import canonical_path, plan_ranks, text_encoder_targets, unet_targets  # noqa: E402
from tuner.adapters.types import LoraModule, LoraWeights  # noqa: E402
from tuner.formats.convert import convert_file  # noqa: E402
from tuner.formats.io import read_safetensors  # noqa: E402
from tuner.formats.lorafile import save_lora  # noqa: E402
from tuner.formats.metadata import build_lora_metadata  # noqa: E402
from tuner.models.families import SD15, SDXL, Family  # noqa: E402
from tuner.models.single_file import family_config  # noqa: E402

GET_THEM = """\
This check imports ComfyUI and kohya sd-scripts from checkouts you make yourself:
    git clone https://github.com/comfyanonymous/ComfyUI /tmp/ComfyUI
    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
    pip install einops
    python bench/interop_keys.py --comfyui /tmp/ComfyUI --sd-scripts /tmp/sd-scripts"""

FAMILIES = {"sd15": SD15, "sdxl": SDXL}
RANK, ALPHA = 4, 1.0


# ------------------------------------------------------------------------------------ models on meta


def meta_models(family: Family) -> dict[str, nn.Module]:
    """The family's diffusers UNet and transformers text encoders, full size, on the meta device."""
    import transformers
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        models: dict[str, nn.Module] = {"unet": UNet2DConditionModel.from_config(family_config(family, "unet"))}
        for spec in family.text_encoders:
            config = transformers.CLIPTextConfig(**family_config(family, spec.component))
            models[spec.component] = getattr(transformers, spec.model_class)(config)
    return models


# ------------------------------------------------------------------------------------ tuner's files


def tuner_weights(family: Family, preset: str, seed: int = 0) -> LoraWeights:
    """Random rank-4 factors for every module the preset (``kohya`` or ``locon``) and the text-encoder
    targets adapt, keyed as training keys them (``unet:...``, ``text_encoder:text_model....``)."""
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    for component, model in meta_models(family).items():
        targets = unet_targets(model, preset) if component == "unet" else text_encoder_targets(model)
        conv = dict(conv_rank=RANK, conv_alpha=ALPHA) if preset == "locon" else {}
        for path, (rank, alpha) in plan_ranks(model, targets, rank=RANK, alpha=ALPHA, **conv).items():
            w = model.get_submodule(path).weight
            kernel = tuple(w.shape[2:])
            down = torch.randn((rank, w.shape[1], *kernel), generator=gen) * 0.01
            up = torch.randn((w.shape[0], rank, *((1, 1) if kernel else ())), generator=gen) * 0.01
            modules[f"{component}:{canonical_path(component, path)}"] = LoraModule(down, up, alpha)
    return LoraWeights(modules=modules)


def write_files(family: Family, folder: Path) -> list[Path]:
    """kohya LoRA and LoCon files for ``family``, and each converted to diffusers and PEFT names."""
    paths = []
    for preset, variant in (("kohya", "lora"), ("locon", "locon")):
        name = f"{family.name}_{variant}"
        args = {"conv_dim": RANK, "conv_alpha": ALPHA} if preset == "locon" else None
        meta = build_lora_metadata(family=family, rank=RANK, alpha=ALPHA, output_name=name, network_args=args)
        kohya = folder / f"{name}.safetensors"
        save_lora(kohya, tuner_weights(family, preset), family, dtype=torch.float16, metadata=meta)
        paths.append(kohya)
        for layout in ("diffusers", "peft"):
            out = folder / f"{name}.{layout}.safetensors"
            convert_file(kohya, layout, out)
            paths.append(out)
    return paths


# ------------------------------------------------------------------------------------ importing rivals


class _Placeholder(types.ModuleType):
    """Stands in for a module the rivals import at load time but this check never runs."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self

    def __mro_entries__(self, bases: tuple[object, ...]) -> tuple[type, ...]:
        return (object,)


def _placeholder(name: str) -> _Placeholder:
    module = sys.modules.get(name)
    if not isinstance(module, _Placeholder):
        module = _Placeholder(name)
        module.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = module
    return module


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _placeholder(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def stand_in_for_missing(names: tuple[str, ...]) -> list[str]:
    """Install placeholders for those of ``names`` that cannot be imported; returns their names."""
    missing = []
    for name in names:
        try:
            ok = importlib.util.find_spec(name) is not None and bool(importlib.import_module(name))
        except Exception:  # an installed but broken build (e.g. torchvision for another torch) counts too
            ok = False
        if not ok:
            sys.modules.pop(name, None)
            missing.append(name)
    if missing:
        sys.meta_path.append(_PlaceholderFinder(set(missing)))
    return missing


@contextlib.contextmanager
def captured_warnings(logger_name: str | None = None) -> Iterator[list[str]]:
    """Messages of WARNING and above logged while inside (root logger, or ``logger_name``)."""
    messages: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Handler(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------ the loaders


@dataclass
class Outcome:
    total: int
    dropped: list[str]

    @property
    def matched(self) -> int:
        return self.total - len(self.dropped)


Loader = Callable[[dict[str, torch.Tensor]], Outcome]


def comfyui_loader(comfy_dir: Path, family: Family, unet_keys: dict[str, torch.Tensor]) -> Loader:
    sys.path.insert(0, str(comfy_dir))
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its command line at import; keep it off any GPU
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.sdxl_clip

    config = comfy.model_detection.model_config_from_diffusers_unet(unet_keys)
    model = config.get_model({}, device="meta")
    clip_class = comfy.sdxl_clip.SDXLClipModel if family is SDXL else comfy.sd1_clip.SD1ClipModel
    clip = clip_class(device="meta")
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    weights = {**model.state_dict(), **clip.state_dict()}
    print(f"  ComfyUI: {type(config).__name__} model, {type(clip).__name__}, {len(key_map)} LoRA names mapped")

    def load(tensors: dict[str, torch.Tensor]) -> Outcome:
        sd = comfy.lora_convert.convert_lora(dict(tensors))
        with captured_warnings() as messages:
            patches = comfy.lora.load_lora(sd, key_map)
        prefix = "lora key not loaded: "
        dropped = [m[len(prefix):] for m in messages if m.startswith(prefix)]
        by_name: dict[str, list[str]] = {}  # LoRA name in the key map -> the file keys of that module
        for file_key in sd:
            parts = file_key.split(".")
            name = next((n for i in range(len(parts) - 1, 0, -1) if (n := ".".join(parts[:i])) in key_map), None)
            if name is not None:
                by_name.setdefault(name, []).append(file_key)
        by_target: dict[object, list[str]] = {}
        for name, file_keys in by_name.items():
            by_target.setdefault(key_map[name], []).extend(file_keys)
        for target, patch in patches.items():
            key = target if isinstance(target, str) else target[0]
            used = sorted(by_target.get(target, ()))
            if key not in weights:  # what ModelPatcher.add_patches skips ("NOT LOADED")
                dropped += used
                continue
            # what ComfyUI computes when it patches: it logs (not raises) a failure, e.g. a shape that does not fit
            with captured_warnings() as errors:
                try:
                    patch.calculate_weight(weights[key], key, 1.0, 1.0, None, lambda w: w)
                except Exception as exc:
                    errors.append(repr(exc))
            if errors:
                dropped += [f"{k} ({errors[0][:120]})" for k in used]
        return Outcome(len(tensors), dropped)

    return load


class _WithTextModel(nn.Module):
    """transformers 4's CLIPTextModel tree (``text_model.encoder...``) around a transformers 5 one."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.text_model = inner


def kohya_loader(sd_scripts_dir: Path, family: Family, models: dict[str, nn.Module]) -> Loader:
    sys.path.insert(0, str(sd_scripts_dir))
    from library import original_unet, sdxl_original_unet
    from networks import lora as kohya_lora

    with torch.device("meta"):
        if family is SDXL:
            unet = sdxl_original_unet.SdxlUNet2DConditionModel()
        else:
            cfg = family_config(family, "unet")
            unet = original_unet.UNet2DConditionModel(
                sample_size=cfg["sample_size"], attention_head_dim=cfg["attention_head_dim"],
                cross_attention_dim=cfg["cross_attention_dim"],
                use_linear_projection=cfg.get("use_linear_projection", False),
            )
    encoders = [models[spec.component] for spec in family.text_encoders]
    wrapped = [e if hasattr(e, "text_model") else _WithTextModel(e) for e in encoders]
    if any(w is not e for w, e in zip(wrapped, encoders)):
        print("  kohya: text encoder wrapped in a `text_model` level (transformers 5; kohya pins 4.x)")
    text_encoder: list[nn.Module] | nn.Module = wrapped if len(wrapped) > 1 else wrapped[0]
    print(f"  kohya: {type(unet).__name__} on meta")

    def load(tensors: dict[str, torch.Tensor]) -> Outcome:
        weights_sd = dict(tensors)
        with contextlib.redirect_stdout(None), captured_warnings():
            network, weights_sd = kohya_lora.create_network_from_weights(
                1.0, None, None, text_encoder, unet, weights_sd=weights_sd
            )
            network.apply_to(text_encoder, unet)
        own = network.state_dict()
        unfit = [k for k, v in weights_sd.items() if k in own and own[k].shape != v.shape]
        result = network.load_state_dict({k: v for k, v in weights_sd.items() if k not in unfit}, strict=False)
        # create_network_from_weights may rename keys (diffusers -> SAI for SDXL): count per renamed key
        return Outcome(len(tensors), sorted(result.unexpected_keys) + unfit)

    return load


def diffusers_loader(family: Family) -> Loader:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    mixin = StableDiffusionXLLoraLoaderMixin if family is SDXL else StableDiffusionLoraLoaderMixin

    def load(tensors: dict[str, torch.Tensor]) -> Outcome:
        models = meta_models(family)  # fresh: loading injects LoRA layers
        try:
            state, alphas = mixin.lora_state_dict(dict(tensors), unet_config=models["unet"].config)
        except Exception as exc:  # its kohya converter refuses (ValueError, KeyError) keys it cannot rename
            return Outcome(len(tensors), [f"conversion refused: {str(exc)[:200]}"] * len(tensors))
        with captured_warnings("diffusers"), warnings_off():
            mixin.load_lora_into_unet(state, alphas, models["unet"], adapter_name="check")
            for spec in family.text_encoders:
                mixin.load_lora_into_text_encoder(
                    state, alphas, models[spec.component], prefix=spec.component, adapter_name="check"
                )
        params = {
            f"{component}.{name}" for component, model in models.items() for name, _ in model.named_parameters()
        }
        dropped = []
        for key in state:
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            component, _, rest = key.partition(".")
            candidates = {rest, rest.removeprefix("text_model.")}
            found = any(
                f"{component}.{c.replace('.lora_A.', '.lora_A.check.').replace('.lora_B.', '.lora_B.check.')}" in params
                for c in candidates
            )
            if not found:
                dropped.append(key)
        return Outcome(len(tensors), dropped)

    return load


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=GET_THEM,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout (the folder holding comfy/)")
    parser.add_argument("--sd-scripts", type=Path, help="a kohya-ss/sd-scripts checkout (holding networks/)")
    parser.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--out", type=Path, help="keep the files in this folder (default: a temporary one)")
    parser.add_argument("--show", type=int, default=5, help="dropped keys to list per cell")
    args = parser.parse_args(argv)
    for flag, path, marker in (("--comfyui", args.comfyui, "comfy/lora.py"),
                               ("--sd-scripts", args.sd_scripts, "networks/lora.py")):
        if path is None or not (path / marker).is_file():
            print(f"{flag}: {'missing' if path is None else f'no {marker} under {path}'}\n\n{GET_THEM}",
                  file=sys.stderr)
            return 2
    if importlib.util.find_spec("einops") is None:
        print(f"einops is not installed (ComfyUI and sd-scripts import it)\n\n{GET_THEM}", file=sys.stderr)
        return 2
    families = [FAMILIES[name] for name in args.families.split(",")]

    with contextlib.ExitStack() as stack:
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="interop_keys_")))
        out.mkdir(parents=True, exist_ok=True)
        plans = []
        for family in families:
            t0 = time.time()
            files = write_files(family, out)
            print(f"{family.name}: wrote {len(files)} files in {time.time() - t0:.0f}s to {out}")
            plans.append((family, files, meta_models(family)))
        import diffusers  # noqa: F401  (before any placeholder: diffusers probes optional packages once)

        placeholders = stand_in_for_missing(("torchvision", "cv2"))
        if placeholders:
            print(f"placeholders for modules not installed or not importable: {', '.join(placeholders)}")
        rows = []
        for family, files, models in plans:
            unet_keys = models["unet"].state_dict()
            loaders = {
                "ComfyUI": comfyui_loader(args.comfyui, family, unet_keys),
                "kohya": kohya_loader(args.sd_scripts, family, models),
                "diffusers": diffusers_loader(family),
            }
            for path in files:
                tensors, _ = read_safetensors(path)
                for name, load in loaders.items():
                    rows.append((path.name, name, load(tensors)))
    return report(rows, args.show)


def report(rows: list[tuple[str, str, Outcome]], show: int) -> int:
    width = max(len(f) for f, _, _ in rows)
    print(f"\n{'file':<{width}}  {'loader':<9}  {'total':>6}  {'matched':>7}  {'dropped':>7}")
    failed = False
    for file, loader, outcome in rows:
        kohya_format = file.count(".") == 1  # name.safetensors; exports are name.peft/.diffusers.safetensors
        # A diffusers/PEFT export is for diffusers (FORMATS.md §3): other loaders' rows are information.
        note = "" if kohya_format or loader == "diffusers" else "  (not a target of this layout)"
        print(f"{file:<{width}}  {loader:<9}  {outcome.total:>6}  {outcome.matched:>7}  {len(outcome.dropped):>7}{note}")
        for key in outcome.dropped[:show]:
            print(f"{'':<{width}}    dropped: {key}")
        failed |= (kohya_format or loader == "diffusers") and bool(outcome.dropped)
    print("\n" + ("SOME KEYS DROPPED" if failed else "zero keys dropped: kohya files by every loader, exports by diffusers"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
