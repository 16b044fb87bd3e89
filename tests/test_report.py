"""The run report page and the noise offset of the objective."""

from __future__ import annotations

import torch
from PIL import Image

from tuner.report import svg_curve, write_report


def test_report_links_images_and_plots_curves(tmp_path):
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    page = write_report(tmp_path / "r" / "report.html", title="t<x>", history={"loss": [3.0, 2.0, 1.0], "lr": [1e-3] * 3},
                        images=[("grid", img)], recipe_toml="[model]\nbase = \"tiny\"\n", facts={"k": "v"},
                        evals={"subject": "all 8 50.0%"})
    text = page.read_text()
    assert "../imgs/a.png" in text and text.count("<svg") == 2 and "t&lt;x&gt;" in text
    assert "all 8 50.0%" in text and "base = &quot;tiny&quot;" in text
    assert not list(page.parent.glob(".*.tmp"))


def test_svg_curve_maps_extremes_to_the_frame():
    svg = svg_curve([1.0, 3.0], title="loss", width=100, height=100, smooth=1)
    assert "30.0,70.0 70.0,30.0" in svg  # first point bottom-left, last top-right inside the 30 px padding


def test_noise_offset_adds_per_channel_constants():
    from diffusers import DDPMScheduler

    from tuner.train.objective import add_noise

    latents = torch.zeros(64, 4, 8, 8)
    sched = DDPMScheduler()
    _, plain, _ = add_noise(latents, sched, torch.Generator().manual_seed(0))
    _, offset, _ = add_noise(latents, sched, torch.Generator().manual_seed(0), noise_offset=1.0)
    per_channel_mean = offset.mean(dim=(2, 3))
    assert per_channel_mean.std() > 0.8  # dominated by the N(0, 1) per-channel offset
    assert plain.mean(dim=(2, 3)).std() < 0.3


def test_cli_sampler_choices_match_the_sampler():
    from tuner.cli import build_parser
    from tuner.sample.sampler import SAMPLERS

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = next(a.choices for a in sample._actions if a.dest == "sampler")
    assert tuple(choices) == SAMPLERS
