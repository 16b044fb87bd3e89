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
