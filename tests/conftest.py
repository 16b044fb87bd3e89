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
