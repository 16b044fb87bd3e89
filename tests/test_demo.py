"""The README's main job, in a short configuration."""

from __future__ import annotations

from PIL import Image

from tuner.demo import DEMO_PROMPTS, run_demo
from tuner.formats.io import read_header


def test_demo_short_run_writes_everything(tmp_path):
    lines: list[str] = []
    files = run_demo(tmp_path, steps=2, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert read_header(files["lora"])[0]["ss_output_name"] == "sks_star"
    grid = Image.open(files["before_after"])
    assert grid.size == (64 * len(DEMO_PROMPTS), 128)
    assert sorted(p.name for p in files["previews"].iterdir()) == ["step_000001.png", "step_000002.png"]
    assert len(list(files["data"].glob("*.png"))) == 6
    text = "\n".join(lines)
    assert "RANDOMLY INITIALISED" in text and str(files["lora"]) in text
