"""Every shipped recipe validates and trains two steps on the tiny base (STYLE.md #3)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tuner.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml")) + sorted((ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.fixture(scope="module")
def small_sdxl_folder(tmp_path_factory) -> Path:
    """SDXL's exact topology at tiny widths as a diffusers folder (tuner.models.small): sdxl recipes run on it."""
    from tuner.models.base import export_base
    from tuner.models.small import small_base

    return export_base(small_base("sdxl"), tmp_path_factory.mktemp("sdxl") / "base")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_trains_two_steps(recipe, tmp_path, monkeypatch, request):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe opens with a comment saying what it does"
    assert "tuner train" in recipe.read_text(), "a recipe says the exact command"
    args = ["train", str(recipe), "--steps", "2", "--output", str(tmp_path), "--set", "preview.every=0",
            "--set", "prior.num_images=2", "--set", "prior.steps=2"]
    if "sd15" in recipe.parts or "sdxl" in recipe.parts:  # real-model recipes: same settings, run on a tiny
        # base of the family (sd15: the tiny base; sdxl: SDXL's topology at tiny widths) and a tiny data set
        base = str(request.getfixturevalue("small_sdxl_folder")) if "sdxl" in recipe.parts else "tiny"
        args += ["--base", base, "--resolution", "64",
                 "--set", "train.mixed_precision=no", "--set", "optim.optimizer=adamw"]
        if "embedding" in tomllib.loads(recipe.read_text()):  # its token must be in the captions
            args += ["--data", "datasets/pink", "--set", 'embedding.tokens=["<pink>"]',
                     "--set", 'embedding.init_words=["purple"]']
        else:
            args += ["--data", "datasets/sks_star"]
    code = main(args)
    assert code == 0
    assert list(tmp_path.rglob("*.safetensors"))
