"""`tuner validate`: every problem of a recipe and its data at once, without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("validate must not load a model")

    monkeypatch.setattr("tuner.models.base.load_base", refuse)
    monkeypatch.setattr("tuner.models.base._load_diffusers_folder", refuse)
    monkeypatch.chdir(ROOT)


def test_a_good_recipe_prints_the_resolved_recipe_and_the_step_arithmetic(capsys, tmp_path):
    code = main(["validate", "recipes/tiny/pink_pivotal.toml", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert '[embedding]\ntokens = ["<pink>"]' in out
    assert "6 images -> 60 samples per epoch" in out and "300 steps = 20.00 epochs" in out
    assert "no problems found" in out


def test_every_disk_problem_is_reported_together(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["validate", "recipes/sd15/dreambooth.toml", "--output", str(blocker / "out"),
                 "--set", "prior.class_prompts=[]", "--set", f"prior.class_dir={tmp_path / 'cls'}"])
    out = capsys.readouterr().out
    assert code == 2
    assert "4 problem(s):" in out
    assert "model.base: base model path '/path/to/stable-diffusion-v1-5' does not exist" in out
    assert "data.path: dataset folder /path/to/photos does not exist" in out
    assert f"output.dir = '{blocker / 'out'}' cannot be written" in out and "is a file" in out
    assert f"prior.class_prompts: empty, and '{tmp_path / 'cls'}' lacks 200 class images" in out


def test_a_token_missing_from_the_captions_is_a_problem(capsys):
    code = main(["validate", "recipes/tiny/pink_textual_inversion.toml", "--data", "datasets/sks_star"])
    out = capsys.readouterr().out
    assert code == 2
    assert "embedding.tokens: embedding.tokens ['<pink>'] appear in none of the 6 captions" in out


def test_recipe_errors_are_listed_and_nothing_else_runs(capsys):
    code = main(["validate", "recipes/tiny/sks_star_lora.toml", "--set", "train.steps=0", "--set", "optim.lr=1"])
    out = capsys.readouterr().out
    assert code == 2
    assert "2 problem(s) in the recipe" in out and "train.steps = 0" in out and "optim.lr" in out
    assert "step arithmetic" not in out


def test_class_images_to_generate_are_counted(capsys, tmp_path):
    code = main(["validate", "recipes/tiny/sks_star_dreambooth_lora.toml", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"class images: 0 in '{tmp_path / 'class_images'}', 144 to generate before training" in out  # num_images
