"""Shared fixtures: small datasets and a trained tiny-base run, built once per session. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "black": (20, 20, 20)}


def write_circles(folder: Path, n: int = 4) -> Path:
    """``n`` 64 px images of a white disc on coloured backgrounds, with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(list(COLOURS.items())[:n]):
        img = Image.new("RGB", (64, 64), rgb)
        ImageDraw.Draw(img).ellipse((18 + i, 18, 46 + i, 46), fill=(245, 245, 245))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a white circle on a {name} background", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def circles(tmp_path_factory) -> Path:
    return write_circles(tmp_path_factory.mktemp("circles"))


def small_recipe(data: Path, out: Path, **changes):
    """A fast recipe on the tiny base; ``changes`` are dotted keys with ``__`` for dots."""
    from tuner.config.schema import Recipe

    r = Recipe()
    r.data.path = str(data)
    r.output.dir = str(out)
    r.output.name = "t"
    r.train.steps = 4
    r.train.batch_size = 2
    r.optim.learning_rate = 1e-3
    for key, value in changes.items():
        table, field = key.split("__")
        setattr(getattr(r, table), field, value)
    return r


def assert_lora_image_matches_diffusers(pipe, family: str, lora: Path, prompt: str, settings, seed: int = 7):
    """The same LoRA file applied by diffusers' ``pipe`` (``load_lora_weights``; built on a fresh
    ``small_base(family)``) and by tuner's sampler gives the same 64 px image at ``seed`` (DDIM): within
    2/255, while the LoRA itself changes the image by more than 8/255 (so the check is not vacuous)."""
    import numpy as np
    import torch

    from tuner.models.small import small_base
    from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for
    from tuner.sample.sampler import sample_images

    pipe.set_progress_bar_config(disable=True)

    def diffusers_image() -> np.ndarray:
        return np.asarray(pipe(prompt, num_inference_steps=settings.steps, guidance_scale=settings.cfg, height=64,
                               width=64, generator=torch.Generator().manual_seed(seed)).images[0]).astype(int)

    reference = diffusers_image()
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    theirs = diffusers_image()

    base = small_base(family)
    plain = np.asarray(sample_images(base, [prompt], [seed], settings)[0]).astype(int)
    apply_loras(base, load_loras_for(base, [LoraSpec(lora)]))
    ours = np.asarray(sample_images(base, [prompt], [seed], settings)[0]).astype(int)

    assert np.abs(plain - reference).max() <= 2, "without a LoRA the two samplers already differ"
    assert np.abs(theirs - reference).max() > 8, "the LoRA should visibly change the image"
    assert np.abs(ours - theirs).max() <= 2


@pytest.fixture(scope="session")
def trained_run(circles, tmp_path_factory):
    """A LoRA (UNet kohya preset + text encoder) trained 30 steps with a high LR so its delta is clearly
    non-zero; exported in fp32 (for exact comparisons) and with the PEFT export."""
    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    out = tmp_path_factory.mktemp("run")
    recipe = small_recipe(
        circles, out, train__steps=30, optim__learning_rate=5e-3, adapter__targets="kohya",
        adapter__train_text_encoder=True, output__save_dtype="fp32", output__peft_export=True,
    )
    run = setup_run(recipe, log=lambda *_: None)
    result = train(run, log=lambda *_: None)
    return run, result
