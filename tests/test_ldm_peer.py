"""A single file tuner writes loads in diffusers (its LDM converters, strictly, and its pipeline loader) with
no key missing, unexpected or unused, and back in tuner identically: bench/ldm_peer_check.py on SD1.5's
exact topology at tiny widths. The full-size run (random SD1.5 weights, ~4 GB) is the bench script itself:
it takes minutes and ~11 GB of memory, too much for the suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tuner.models.small import small_base

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ldm_peer_check.py"


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ldm_peer_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sd15_single_file_loads_in_diffusers_and_back(bench, tmp_path, dtype):
    report = bench.peer_check(small_base("sd15"), tmp_path, dtype=dtype, log=quiet)
    converters = report["diffusers_converters"]
    assert converters["unused"] == 0, converters["unused_examples"]
    for name in ("unet", "vae", "text_encoder"):
        counts = converters[name]
        assert (counts["missing"], counts["unexpected"], counts["wrong_shape"]) == (0, 0, 0), counts[
            "examples"
        ]
        assert counts["strict_load"] == "ok"
    assert report["diffusers_pipeline_max_abs_diff"] == {"unet": 0.0, "vae": 0.0, "text_encoder": 0.0}
    assert report["tuner_max_abs_diff"] == {"unet": 0.0, "vae": 0.0, "text_encoder": 0.0}
    assert report["tuner_family"] == "sd15" and report["ok"]


def test_the_check_sees_stray_and_missing_keys(bench, tmp_path):
    """The strict check is not vacuous: a tensor no converter reads and a weight the file lacks are counted."""
    from safetensors.torch import load_file, save_file

    from tuner.models.single_file import save_single_file

    base = small_base("sd15")
    path = save_single_file(tmp_path / "m.safetensors", base.family, base.components, dtype=None)
    tensors = load_file(str(path))
    tensors["model.diffusion_model.stray.weight"] = torch.ones(3)
    del tensors["first_stage_model.decoder.conv_out.bias"]
    save_file(tensors, str(path))
    report = bench.strict_diffusers_check(path, base)
    assert report["unused"] == 1 and report["unused_examples"] == ["model.diffusion_model.stray.weight"]
    assert report["vae"]["missing"] == 1 and report["vae"]["examples"] == ["decoder.conv_out.bias"]
