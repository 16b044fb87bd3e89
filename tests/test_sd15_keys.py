"""One training step on the full-size SD1.5 architecture (random weights) with the `kohya` preset writes
exactly kohya's key names and shapes (tests/data/kohya_keys_canonical.json, made by kohya's own code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_recipe

from tuner.formats.io import read_header
from tuner.models.base import BaseModel
from tuner.models.families import SD15
from tuner.train.loop import train
from tuner.train.setup import setup_run

REFERENCE = Path(__file__).parent / "data" / "kohya_keys_canonical.json"

SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def sd15_random_base() -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tuner.models.tiny import SCHEDULER_CONFIG, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()  # the real CLIP vocabulary is not shipped yet; ids stay within 49408
    tokenizer.model_max_length = 77
    return BaseModel(
        family=SD15,
        unet=UNet2DConditionModel(**SD15_UNET).eval(),
        vae=AutoencoderKL(**SD15_VAE).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval(),
        tokenizer=tokenizer,
        scheduler_config=dict(SCHEDULER_CONFIG),
        source="sd15-random",
    )


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
