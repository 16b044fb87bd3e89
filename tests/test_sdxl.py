"""SDXL end to end on a small random base with SDXL's exact topology (tuner.models.small): loading from a
diffusers folder and a single file, two-encoder conditioning, LoRA/LoCon training with kohya's SDXL key
names (../shared/reference, rank 4), and the same image as diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_lora_image_matches_diffusers, small_recipe

from tuner.formats.io import read_header
from tuner.models.base import check_base_spec, export_base, load_base
from tuner.models.families import SDXL
from tuner.models.prompts import encode_conditioning, unet_kwargs
from tuner.models.small import small_base
from tuner.sample.generate import LoraSpec, load_loras_for
from tuner.sample.sampler import SampleSettings, sample_images
from tuner.train.loop import train
from tuner.train.setup import setup_run

REFERENCE = Path(__file__).parent / "data" / "kohya_keys_canonical.json"  # copy of ../shared/reference
PROMPT = "a white circle on a green background"
SETTINGS = SampleSettings(steps=6, cfg=5.0, sampler="ddim", width=64, height=64)


def reference_keys(case: str) -> dict[str, tuple[str, list[int]]]:
    return json.loads(REFERENCE.read_text())[case]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def sdxl_lora(circles, tmp_path_factory) -> Path:
    """A kohya LoRA (UNet + both text encoders) trained 4 steps with a high LR on the small SDXL base."""
    recipe = small_recipe(
        circles, tmp_path_factory.mktemp("sdxl"), train__steps=4, train__batch_size=1, data__resolution=64,
        adapter__targets="kohya", adapter__rank=4, adapter__train_text_encoder=True, optim__learning_rate=2e-2,
        output__save_dtype="fp32",
    )
    return train(setup_run(recipe, base=small_base("sdxl"), log=quiet), log=quiet).outputs[0]


def test_conditioning_follows_the_family_record():
    base = small_base("sdxl")
    with torch.no_grad():
        cond = encode_conditioning(base, [PROMPT, ""])
        hidden = [
            encoder(tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids,
                    output_hidden_states=True)
            for encoder, tokenizer in ((base.text_encoder, base.tokenizer), (base.text_encoder_2, base.tokenizer_2))
        ]
    assert cond.embeds.shape == (2, 77, 32 + 64) and cond.pooled is not None and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.embeds, torch.cat([h.hidden_states[-2] for h in hidden], dim=-1))  # penultimate
    assert torch.equal(cond.pooled, hidden[1].text_embeds)
    kwargs = unet_kwargs(SDXL, cond, target_size=(64, 48), original_sizes=[(100, 80), (64, 48)], crops=[(3, 5), (0, 0)])
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[100, 80, 3, 5, 64, 48], [64, 48, 0, 0, 64, 48]]
    assert set(base.text_encoders) == {"text_encoder", "text_encoder_2"}


def test_load_base_reads_sdxl_folders_and_single_files(tmp_path):
    from tuner.models.single_file import save_single_file

    base = small_base("sdxl")
    folder = export_base(base, tmp_path / "folder")
    assert (folder / "text_encoder_2").is_dir() and (folder / "tokenizer_2").is_dir()
    file = save_single_file(tmp_path / "xl.safetensors", SDXL, base.components, dtype=None)
    expected = np.asarray(sample_images(base, [PROMPT], [3], SETTINGS)[0])
    for spec in (str(folder), str(file)):
        assert check_base_spec(spec) is SDXL
        loaded = load_base(spec)
        assert loaded.family is SDXL and loaded.tokenizer_2.pad_token == "!"
        for name, module in base.components.items():
            theirs = loaded.components[name].state_dict()
            assert all(torch.equal(t, theirs[k]) for k, t in module.state_dict().items()), (spec, name)
        got = np.asarray(sample_images(loaded, [PROMPT], [3], SETTINGS)[0])
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, spec


def test_sdxl_lora_has_kohya_names_and_loads_in_the_sampler(sdxl_lora):
    metadata, header = read_header(sdxl_lora)
    reference = reference_keys("sdxl_lora")
    assert set(header) == set(reference) and len(header) == 2958
    for key in reference:
        if key.endswith(".alpha"):
            assert list(header[key][1]) == []
        else:  # widths differ from full size; the rank (first dim of down, second of up) does not
            assert header[key][1][0 if "lora_down" in key else 1] == 4, key
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    base = small_base("sdxl")
    loaded = load_loras_for(base, [LoraSpec(sdxl_lora)])
    assert {k.split(":")[0] for k in loaded[0].weights.modules} == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.slow
def test_sdxl_locon_has_kohya_names(circles, tmp_path):
    recipe = small_recipe(
        circles, tmp_path, train__steps=1, train__batch_size=1, data__resolution=64, adapter__targets="locon",
        adapter__rank=4, adapter__conv_rank=4, adapter__train_text_encoder=True, output__save_dtype="fp32",
    )
    result = train(setup_run(recipe, base=small_base("sdxl"), log=quiet), log=quiet)
    _, header = read_header(result.outputs[0])
    assert set(header) == set(reference_keys("sdxl_locon"))


def test_sdxl_lora_matches_diffusers_pipeline(sdxl_lora):
    """The same file applied by tuner's sampler and by diffusers' StableDiffusionXLPipeline
    (load_lora_weights) gives the same image at the same seed with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    theirs_base = small_base("sdxl")
    pipe = StableDiffusionXLPipeline(
        scheduler=DDIMScheduler.from_config(theirs_base.scheduler_config),
        **theirs_base.components, **theirs_base.tokenizers,
    )
    assert_lora_image_matches_diffusers(pipe, "sdxl", sdxl_lora, PROMPT, SETTINGS)


@pytest.mark.slow
def test_sdxl_dreambooth_writes_a_folder_and_an_extracted_lora(circles, tmp_path):
    folder = export_base(small_base("sdxl"), tmp_path / "base")
    recipe = small_recipe(
        circles, tmp_path / "out", train__steps=1, train__batch_size=1, data__resolution=64, model__base=str(folder),
        adapter__method="dreambooth", adapter__rank=4, adapter__train_text_encoder=True, optim__learning_rate=1e-3,
    )
    outputs = train(setup_run(recipe, log=quiet), log=quiet).outputs
    tuned, original = load_base(str(outputs[0])), load_base(str(folder))
    assert tuned.family is SDXL
    q = "text_model.encoder.layers.31.self_attn.q_proj.weight"
    assert not torch.equal(tuned.text_encoder_2.state_dict()[q], original.text_encoder_2.state_dict()[q])
    _, header = read_header(outputs[1])
    assert "lora_unet_input_blocks_4_1_proj_in.lora_down.weight" in header  # LDM names, as kohya
    assert "text_encoder_2: dropped: largest |diff|" in outputs[2].read_text()  # 1 step: below min_diff

