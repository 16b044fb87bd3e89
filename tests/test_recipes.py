"""Every shipped recipe validates and trains two steps on the tiny base (STYLE.md #3)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from safetensors import safe_open

from tuner.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml")) + sorted((ROOT / "recipes").rglob("*.yaml"))
# Real-model recipes run on a small base of their family: sd15 on the tiny base, sd2 and sdxl on the family's
# exact topology at tiny widths (tuner.models.small).
SMALL_FAMILY = {"sd2": "sd2", "sdxl": "sdxl"}


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.fixture(scope="module")
def small_base_path(tmp_path_factory):
    """Family name -> a base with that family's topology at tiny widths, written once per module: SDXL as a
    diffusers folder; SD2 as a single file, whose ``tuner`` metadata says sd2 or sd2v (folder detection goes
    by the real cross-attention width, 1024, which the small SD2 does not have)."""
    from tuner.models.base import export_base
    from tuner.models.single_file import save_single_file
    from tuner.models.small import small_base

    paths: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in paths:
            base, where = small_base(family), tmp_path_factory.mktemp(family)
            paths[family] = (
                export_base(base, where / "base") if family == "sdxl"
                else save_single_file(where / "base.safetensors", base.family, base.components, dtype=None)
            )
        return paths[family]

    return get


def recipe_args(recipe: Path, tmp_path: Path, small_base_path) -> list[str]:
    """Command-line arguments (after the subcommand) that run ``recipe`` for two steps on a small base."""
    settings = tomllib.loads(recipe.read_text())
    args = [str(recipe), "--steps", "2", "--output", str(tmp_path), "--set", "preview.every=0",
            "--set", "prior.num_images=2", "--set", "prior.steps=2"]
    family = next((p for p in recipe.parts if p in ("sd15", *SMALL_FAMILY)), None)
    if family is not None:  # real-model recipes: same settings, on a small base of the family and a tiny data set
        base = str(small_base_path(SMALL_FAMILY[family])) if family in SMALL_FAMILY else "tiny"
        args += ["--base", base, "--resolution", "64", "--set", "train.mixed_precision=no"]
        if settings.get("optim", {}).get("optimizer") == "adamw8bit":  # bitsandbytes' 8-bit AdamW is for GPUs:
            args += ["--set", "optim.optimizer=adamw"]  # plain AdamW here; Adafactor runs as the recipe says
        if "embedding" in settings:  # its token must be in the captions
            args += ["--data", "datasets/pink", "--set", 'embedding.tokens=["<pink>"]',
                     "--set", 'embedding.init_words=["purple"]']
        else:
            args += ["--data", "datasets/sks_star"]
    return args


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_trains_two_steps(recipe, tmp_path, monkeypatch, small_base_path):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    text = recipe.read_text()
    assert text.splitlines()[0].startswith("#"), "a recipe opens with a comment saying what it does"
    assert "tuner train" in text, "a recipe says the exact command"
    if any(p in recipe.parts for p in SMALL_FAMILY):  # the real-model recipes added with the family records
        assert "MEMORY NOTES" in text and "tuner plan" in text, "memory notes say where their numbers come from"
    args = recipe_args(recipe, tmp_path, small_base_path)
    assert main(["validate", *args]) == 0
    assert main(["train", *args]) == 0
    assert list(tmp_path.rglob("*.safetensors"))


def test_sd2_recipe_runs_on_a_768v_base(tmp_path, monkeypatch, capsys, small_base_path):
    """recipes/sd2/README.md: the sd2 files train a 768-v base as they are: at 768 px unless told otherwise,
    on the v target, and the LoRA says so."""
    monkeypatch.chdir(ROOT)
    recipe = ROOT / "recipes" / "sd2" / "subject_lora.toml"
    args = recipe_args(recipe, tmp_path, small_base_path)
    args[args.index("--base") + 1] = str(small_base_path("sd2v"))
    at = args.index("--resolution")
    native = args[:at] + args[at + 2:]  # the family's own resolution
    assert main(["validate", *native]) == 0
    assert "(family sd2v, 768 px)" in capsys.readouterr().out
    assert main(["train", *args]) == 0
    with safe_open(str(tmp_path / "sd2_subject.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v"
    assert json.loads(meta["tuner"])["family"] == "sd2v"
