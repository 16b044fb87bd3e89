"""Does a peer that reads LDM checkpoints load the single file tuner writes, with no key missing or left over?
(issue 5: "a full-size SD1.5 architecture (random weights) saved by tuner as a single file loads in a peer
tool that reads LDM checkpoints, with no missing or unexpected keys; and tuner loads it back identically")

The model is SD1.5's full architecture with random weights (``tuner.models.random_base``: UNet 860M, VAE,
CLIP ViT-L; no download). tuner writes it with ``save_single_file`` (fp16 by default, what sharing sites
carry), and then:

1. **diffusers' converters, strictly**: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
   ``convert_ldm_clip_checkpoint`` (what ``from_single_file`` runs) turn the file into each component's state
   dict; ``missing`` = parameters of the diffusers model the converter did not produce, ``unexpected`` = keys
   it produced that the model does not have, ``wrong shape`` = both have it with other shapes, and
   ``unused`` = tensors of the file no converter read (compared by storage, so a renamed or reshaped tensor
   counts as read). Each component is then loaded with ``load_state_dict(strict=True)``.
2. **diffusers' pipeline loader**: ``StableDiffusionPipeline.from_single_file(file, config=<folder of
   configs only>, local_files_only=True)`` (the configs are the model's own, written beside it: no hub), and
   the max |difference| of every weight to the original (rounded to the file's dtype).
3. **tuner's loader**: ``load_base(file)`` and the same comparison.

Run (about 4.3 GB of fp32 weights in memory, up to three copies at once; a few minutes on 2 CPU cores)::

    OMP_NUM_THREADS=2 python bench/ldm_peer_check.py            # full-size SD1.5, fp16 file
    OMP_NUM_THREADS=2 python bench/ldm_peer_check.py --dtype fp32
    python bench/ldm_peer_check.py --small                      # SD1.5 topology at tiny widths (seconds)

It prints one line per check and a JSON summary (``--json PATH`` also writes it); the exit status is 1 if
any count is not zero or a loaded weight differs. tests/test_ldm_peer.py runs the same checks on the small
topology (the full size takes minutes and ~11 GB, too much for the 10-minute suite on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write_config_folder(base: Any, folder: Path) -> Path:
    """A diffusers folder with every component's config and the tokenizer but no weights: what
    ``from_single_file(config=...)`` reads instead of the hub."""
    from diffusers import DDIMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    base.unet.save_config(folder / "unet")
    base.vae.save_config(folder / "vae")
    base.text_encoder.config.save_pretrained(folder / "text_encoder")
    base.tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler.from_config(base.scheduler_config).save_config(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", type(base.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def strict_diffusers_check(path: Path, base: Any) -> dict[str, Any]:
    """Step 1 of the module docstring: counts per component and the file's unused tensors."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    converted = {
        "unet": convert_ldm_unet_checkpoint(dict(tensors), dict(base.unet.config)),
        "vae": convert_ldm_vae_checkpoint(dict(tensors), dict(base.vae.config)),
        "text_encoder": convert_ldm_clip_checkpoint(dict(tensors)),
    }
    if not hasattr(base.text_encoder, "text_model"):  # transformers >= 5 CLIPTextModel: no text_model level
        converted["text_encoder"] = {
            k.removeprefix("text_model."): v for k, v in converted["text_encoder"].items()
        }
    report: dict[str, Any] = {"file_tensors": len(tensors)}
    read = {t.untyped_storage().data_ptr() for state in converted.values() for t in state.values()}
    unused = sorted(k for k, t in tensors.items() if t.untyped_storage().data_ptr() not in read)
    report["unused"] = len(unused)
    report["unused_examples"] = unused[:5]
    for name, state in converted.items():
        model = base.components[name]
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        report[name] = {
            "keys": len(state),
            "missing": len(missing),
            "unexpected": len(unexpected),
            "wrong_shape": len(wrong),
            "examples": (missing + unexpected + wrong)[:5],
        }
        if not (missing or unexpected or wrong):  # load it into a fresh model (on the meta device: no memory)
            with torch.device("meta"):
                target = (
                    type(model)(model.config)
                    if name == "text_encoder"
                    else type(model).from_config(model.config)
                )
            result = target.load_state_dict(state, strict=False, assign=True)
            leftover = [k for k in result.missing_keys if not k.endswith("position_ids")]
            report[name]["strict_load"] = "ok" if not (leftover or result.unexpected_keys) else "failed"
            del target
    del tensors, converted
    gc.collect()
    return report


def max_differences(reference: Any, loaded: Any, dtype: torch.dtype) -> dict[str, float]:
    """Per component: the max |difference| between ``loaded``'s weights and ``reference``'s rounded to
    ``dtype`` (the file's); keys that one side lacks count as infinity."""
    out = {}
    for name, module in reference.components.items():
        theirs = loaded.components[name].state_dict()
        worst = 0.0
        for key, tensor in module.state_dict().items():
            if key.endswith("position_ids"):
                continue
            if key not in theirs:
                worst = float("inf")
                break
            expected = tensor.to(dtype).float()
            worst = max(worst, float((theirs[key].float() - expected).abs().max()))
        out[name] = worst
    return out


class _Loaded:
    """The pipeline's components under the names ``max_differences`` compares."""

    def __init__(self, pipe: Any) -> None:
        self.components = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


def peer_check(base: Any, folder: Path, *, dtype: torch.dtype = torch.float16, log=print) -> dict[str, Any]:
    """Write ``base`` (an SD1.x :class:`~tuner.models.base.BaseModel`) as a single file in ``folder`` and run
    the three checks of the module docstring; returns the report (``ok`` is True when every count is zero
    and every loaded weight equals the original rounded to ``dtype``)."""
    from diffusers import StableDiffusionPipeline

    from tuner.models.base import load_base
    from tuner.models.single_file import save_single_file

    report: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "seconds": {}}
    t0 = time.perf_counter()
    path = save_single_file(folder / "model.safetensors", base.family, base.components, dtype=dtype)
    report["seconds"]["save"] = round(time.perf_counter() - t0, 1)
    report["file_bytes"] = path.stat().st_size
    log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {report['seconds']['save']} s")

    t0 = time.perf_counter()
    report["diffusers_converters"] = strict_diffusers_check(path, base)
    report["seconds"]["diffusers_converters"] = round(time.perf_counter() - t0, 1)
    c = report["diffusers_converters"]
    for name in ("unet", "vae", "text_encoder"):
        r = c[name]
        log(
            f"diffusers converters, {name}: {r['keys']} keys, missing {r['missing']}, unexpected "
            f"{r['unexpected']}, wrong shape {r['wrong_shape']}, strict load {r.get('strict_load', 'skipped')}"
        )
    log(f"diffusers converters: {c['unused']} of the file's {c['file_tensors']} tensors unused")

    t0 = time.perf_counter()
    configs = write_config_folder(base, folder / "configs")
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(configs),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    report["diffusers_pipeline_max_abs_diff"] = max_differences(base, _Loaded(pipe), dtype)
    report["seconds"]["diffusers_pipeline"] = round(time.perf_counter() - t0, 1)
    log(f"diffusers from_single_file: max |diff| per component {report['diffusers_pipeline_max_abs_diff']}")
    del pipe
    gc.collect()

    t0 = time.perf_counter()
    loaded = load_base(str(path))
    report["tuner_family"] = loaded.family.name
    report["tuner_max_abs_diff"] = max_differences(base, loaded, dtype)
    report["seconds"]["tuner_load"] = round(time.perf_counter() - t0, 1)
    log(
        f"tuner load_base: family {loaded.family.name}, max |diff| per component {report['tuner_max_abs_diff']}"
    )
    del loaded
    gc.collect()

    counts = [c["unused"]] + [
        c[n][k] for n in ("unet", "vae", "text_encoder") for k in ("missing", "unexpected", "wrong_shape")
    ]
    report["ok"] = (
        not any(counts)
        and all(c[n].get("strict_load") == "ok" for n in ("unet", "vae", "text_encoder"))
        and report["tuner_family"] == base.family.name
        and not any(report["diffusers_pipeline_max_abs_diff"].values())
        and not any(report["tuner_max_abs_diff"].values())
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--small", action="store_true", help="SD1.5 topology at tiny widths instead of full size"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the written file")
    parser.add_argument("--dir", help="where to write the file (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.small:
        from tuner.models.small import small_base

        base = small_base("sd15")
    else:
        from tuner.models.random_base import sd15_random_base

        base = sd15_random_base()
    params = sum(p.numel() for m in base.components.values() for p in m.parameters())
    print(
        f"built {'small' if args.small else 'full-size'} SD1.5 with random weights: {params / 1e6:.0f}M "
        f"parameters in {time.perf_counter() - t0:.1f} s"
    )
    with tempfile.TemporaryDirectory(prefix="ldm_peer_", dir=args.dir) as tmp:
        report = peer_check(base, Path(tmp), dtype=DTYPES[args.dtype])
    report.update(
        parameters=params,
        model="sd15-small" if args.small else "sd15-full",
        total_seconds=round(time.perf_counter() - t0, 1),
        torch=torch.__version__,
    )
    import diffusers

    report["diffusers"] = diffusers.__version__
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(
        "OK: no key missing, unexpected or unused; every weight loads back identically"
        if report["ok"]
        else "FAILED: see the counts above"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
