"""The README's main job, in a short configuration."""

from __future__ import annotations

from PIL import Image

from tuner.demo import DEMO_PROMPTS, run_demo
from tuner.formats.io import read_header
from tuner.models.base import load_base


def test_demo_short_run_writes_everything(tmp_path):
    lines: list[str] = []
    files = run_demo(tmp_path, steps=2, eval_seeds=1, sample_steps=3, class_images=2,
                     log=lambda *a: lines.append(" ".join(map(str, a))))
    assert read_header(files["lora"])[0]["ss_output_name"] == "sks_star"
    grid = Image.open(files["before_after"])
    assert grid.size == (64 * len(DEMO_PROMPTS), 128)
    assert sorted(p.name for p in files["previews"].iterdir()) == ["step_000001.png", "step_000002.png"]
    assert len(list(files["data"].glob("*.png"))) == 6
    assert len(list((tmp_path / "class_images").glob("class_*.png"))) == 2  # prior preservation is on
    text = "\n".join(lines)
    page = files["report"].read_text()
    assert "<svg" in page and "before_after.png" in page and "step_000002.png" in page
    assert "subject" in text and "prior" in text
    assert str(files["lora"]) in text
    # the demo says plainly when the embedded base is the random stand-in, and only then
    assert ("RANDOMLY INITIALISED" in text) == load_base("tiny").is_random


def test_demo_settings_are_the_recipes_settings(tmp_path):
    """The demo's docstring points users at two recipe files: they must train what the demo trains."""
    from pathlib import Path

    from tuner.config.load import load_recipe
    from tuner.demo import demo_recipe

    recipes = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
    for prior, name in ((True, "sks_star_dreambooth_lora.toml"), (False, "sks_star_lora.toml")):
        ours, theirs = demo_recipe(tmp_path / "data", tmp_path / "out", prior=prior), load_recipe(recipes / name)
        assert ours.adapter == theirs.adapter, name
        assert (ours.train.steps, ours.train.batch_size, ours.train.seed) == (
            theirs.train.steps, theirs.train.batch_size, theirs.train.seed), name
        assert ours.optim.learning_rate == theirs.optim.learning_rate and ours.data.repeats == theirs.data.repeats
        assert ours.optim.text_encoder_lr == theirs.optim.text_encoder_lr, name
        assert ours.prior.enabled == theirs.prior.enabled == prior, name
        if prior:
            assert ours.prior.class_prompts == theirs.prior.class_prompts, name
            assert ours.prior.num_images == theirs.prior.num_images, name
