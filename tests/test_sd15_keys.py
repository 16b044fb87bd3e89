"""One training step on the full-size SD1.5 architecture (random weights) with the `kohya` preset writes
exactly kohya's key names and shapes (tests/data/kohya_keys_canonical.json, made by kohya's own code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_recipe

from tuner.formats.io import read_header
from tuner.models.random_base import sd15_random_base
from tuner.train.loop import train
from tuner.train.setup import setup_run

REFERENCE = Path(__file__).parent / "data" / "kohya_keys_canonical.json"

@pytest.mark.slow
def test_kohya_preset_on_sd15_matches_kohya(circles, tmp_path):
    recipe = small_recipe(
        circles, tmp_path, train__steps=1, train__batch_size=1, data__resolution=64, adapter__targets="kohya",
        adapter__rank=4,
        adapter__alpha=1.0, adapter__train_text_encoder=True, output__save_dtype="fp32",
    )
    run = setup_run(recipe, base=sd15_random_base(), log=lambda *_: None)
    result = train(run, log=lambda *_: None)
    metadata, header = read_header(result.outputs[0])
    reference = json.loads(REFERENCE.read_text())["sd15_lora"]
    assert set(header) == set(reference)
    for key, (dtype, shape) in reference.items():
        assert list(header[key][1]) == shape, key
        assert (header[key][0], dtype) == ("F32", "torch.float32"), key
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "4"
    assert len(header) == 792
