"""The run report page and the noise offset of the objective."""

from __future__ import annotations

import re

import torch
from PIL import Image

from tuner.data.captions import word_frequency
from tuner.report import MAX_POINTS, svg_curve, write_report


def test_report_links_images_and_plots_curves(tmp_path):
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    page = write_report(tmp_path / "r" / "report.html", title="t<x>", history={"loss": [3.0, 2.0, 1.0], "lr": [1e-3] * 3},
                        images={"grids": [("grid", img)]}, recipe_toml="[model]\nbase = \"tiny\"\n", facts={"k": "v"},
                        evals={"subject": "all 8 50.0%"}, dataset="4 images",
                        frequencies={"words": {"circle": 4, "red": 1}})
    text = page.read_text()
    assert "../imgs/a.png" in text and text.count("<svg") == 2 and "t&lt;x&gt;" in text
    assert "all 8 50.0%" in text and "base = &quot;tiny&quot;" in text
    assert "<td>circle</td><td>4</td>" in text and "http-equiv='refresh'" not in text
    assert not list(page.parent.glob(".*.tmp"))


def test_svg_curve_maps_extremes_to_the_frame():
    svg = svg_curve([1.0, 3.0], title="loss", width=100, height=100, smooth=1)
    assert "30.0,70.0 70.0,30.0" in svg  # first point bottom-left, last top-right inside the 30 px padding


def test_svg_curve_skips_non_finite_steps_and_samples_long_runs():
    svg = svg_curve([1.0, float("nan"), 3.0, float("inf")], title="loss", width=90, height=100, smooth=2)
    assert "2 non-finite not drawn" in svg and "nan" not in svg.lower().replace("non-finite", "")
    assert 'points="30.0,70.0 50.0,30.0"' in svg  # x keeps the step: step 3 of 4 sits at 2/3 of the width
    assert 'points="30.0,70.0 50.0,50.0"' in svg  # moving average over the finite values (1, then 2)
    long = svg_curve([float(i % 7) for i in range(50_000)], title="loss")
    assert max(len(p.split()) for p in re.findall(r'points="([^"]*)"', long)) == MAX_POINTS


def test_word_frequency_counts_captions_per_word():
    counts = word_frequency(["a white circle on a red background", "A white circle, the circle's edge"])
    assert list(counts.items())[:2] == [("circle", 2), ("white", 2)] and "a" not in counts and "on" not in counts
    assert counts["circle's"] == 1


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
