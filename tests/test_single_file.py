"""Single-file (LDM layout) checkpoints: detection, safe reading, offline loading, writing, conversion.

Models are built from the families' shipped configs at tiny widths with the real block topology (same
block types and layer counts), so the LDM key names are exactly those of the full-size models.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from tuner.errors import TunerError
from tuner.formats.io import read_header, save_safetensors
from tuner.models.families import FAMILIES, SD2, SD2V, SD15, SDXL, TINY
from tuner.models.single_file import (
    check_single_file,
    components_from_ldm,
    convert_checkpoint,
    family_config,
    load_single_file,
    read_checkpoint,
    save_single_file,
    to_ldm_state_dict,
)


def _seeded(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def tiny_unet(family, widths, cross, **extra):
    from diffusers import UNet2DConditionModel

    cfg = family_config(family, "unet")
    cfg.update(block_out_channels=widths, cross_attention_dim=cross, **extra)
    if isinstance(cfg["attention_head_dim"], list):
        cfg["attention_head_dim"] = [max(1, w // 64) for w in widths]
    return _seeded(UNet2DConditionModel.from_config(cfg), 1)


def tiny_vae(family):
    from diffusers import AutoencoderKL

    cfg = family_config(family, "vae")
    cfg.update(block_out_channels=[32, 32, 64, 64])
    return _seeded(AutoencoderKL.from_config(cfg), 2)


def tiny_text(family, component, hidden, *, projection=None, seed=3):
    import transformers

    cfg = family_config(family, component)
    cls = getattr(transformers, cfg.pop("architectures")[0])
    cfg.update(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=max(1, hidden // 64))
    if projection:
        cfg["projection_dim"] = projection
    return _seeded(cls(transformers.CLIPTextConfig(**cfg)), seed)


@pytest.fixture(scope="module")
def sd15_modules():
    return {
        "unet": tiny_unet(SD15, [32, 32, 64, 64], 32),
        "vae": tiny_vae(SD15),
        "text_encoder": tiny_text(SD15, "text_encoder", 32),
    }


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_family_records():
    assert set(FAMILIES) >= {"sd15", "sd2", "sd2v", "sdxl", "tiny"}
    assert (SD2.prediction_type, SD2.resolution, SD2.ss_base_model_version) == ("epsilon", 512, "sd_v2")
    assert (SD2V.prediction_type, SD2V.resolution, SD2V.ss_base_model_version) == ("v_prediction", 768, "sd_v2_v")
    assert SDXL.kohya_prefixes == {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    assert (SDXL.unet_naming, SDXL.latent_scale, SDXL.modelspec_architecture) == (
        "ldm", 0.13025, "stable-diffusion-xl-v1-base")
    assert [te.hidden_layer for te in SDXL.text_encoders] == ["penultimate", "penultimate"]
    assert [te.pooled for te in SDXL.text_encoders] == [False, True]
    assert SD15.latent_scale == 0.18215 and TINY.prediction_type == "v_prediction"


def test_sd15_round_trip_and_diffusers_peer(tmp_path, sd15_modules):
    path = save_single_file(tmp_path / "m.safetensors", SD15, sd15_modules, dtype=None)
    metadata, entries = read_header(path)
    assert json.loads(metadata["tuner"])["family"] == "sd15"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    # the LDM names A1111/ComfyUI expect (these exist at full size too)
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.out.0.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.decoder.up.3.block.2.conv2.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"):
        assert key in entries, key
    assert entries["first_stage_model.encoder.mid.attn_1.q.weight"][1] == (64, 64, 1, 1)
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in entries)
    assert check_single_file(path) is SD15
    loaded = load_single_file(path)
    assert loaded.family is SD15
    for name, module in sd15_modules.items():
        _same(module, loaded.modules[name])
    ids = loaded.tokenizers["tokenizer"]("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.scheduler_config["prediction_type"] == "epsilon"


def test_load_base_accepts_single_file(tmp_path, sd15_modules):
    from tuner.models.base import check_base_spec, load_base

    path = save_single_file(tmp_path / "m.safetensors", SD15, sd15_modules, dtype=torch.float16)
    assert check_base_spec(str(path)) is SD15
    base = load_base(str(path))
    assert base.family is SD15 and base.latent_scale == pytest.approx(0.18215)
    unet = sd15_modules["unet"].state_dict()
    for key, value in base.unet.state_dict().items():
        assert torch.equal(value, unet[key].half().float()), key
    with pytest.raises(TunerError, match="applies to SD2.x files only"):
        check_base_spec(str(path), prediction_type="v")


def test_sd2_needs_the_prediction_type(tmp_path):
    unet = tiny_unet(SD2, [64, 64, 128, 128], 64)
    vae = tiny_vae(SD2)
    te = tiny_text(SD2, "text_encoder", 64)
    from tuner.formats.ldm import SD1_LAYOUT
    from tuner.formats.ldm_checkpoint import openclip_to_ldm, unet_to_ldm, vae_to_ldm

    tensors = unet_to_ldm(unet.state_dict(), SD1_LAYOUT)
    tensors.update(vae_to_ldm(vae.state_dict(), levels=4, layers_per_block=2))
    te_ldm = openclip_to_ldm(te.state_dict(), "cond_stage_model.model.")
    last = te.config.num_hidden_layers  # the LDM file has one layer more than diffusers keeps
    te_ldm.update({k.replace(".resblocks.0.", f".resblocks.{last}."): v.clone()
                   for k, v in te_ldm.items() if ".resblocks.0." in k})
    tensors.update(te_ldm)
    path = tmp_path / "sd2.safetensors"
    save_safetensors(path, tensors, {"modelspec.prediction_type": "v"})
    with pytest.raises(TunerError, match="--prediction-type v") as err:
        check_single_file(path)
    assert "does not rely on" in str(err.value)
    assert check_single_file(path, prediction_type="v") is SD2V
    loaded = load_single_file(path, prediction_type="epsilon")
    assert loaded.family is SD2 and loaded.tokenizers["tokenizer"].pad_token == "!"
    _same(unet, loaded.modules["unet"])
    _same(te, loaded.modules["text_encoder"])

    # recipes say it with model.prediction_type (train, validate and plan all read it; --prediction-type sets it)
    from tuner.config.load import load_recipe
    from tuner.plan.skeleton import build_skeleton
    from tuner.train.validate import validate_recipe

    recipe = load_recipe(None, [f'model.base="{path}"'])
    problems = validate_recipe(recipe).problems
    assert any("model.prediction_type" in p and p.startswith("model.base") for p in problems), problems
    for said, family in (("v", SD2V), ("epsilon", SD2)):
        recipe = load_recipe(None, [f'model.base="{path}"'], {"model.prediction_type": said})
        notes = validate_recipe(recipe).notes
        assert f"family {family.name}, {family.resolution} px" in " ".join(notes), notes
        assert build_skeleton(str(path), None, recipe.model.prediction).family is family
    # an SD2.x DreamBooth may be written as a single file; the tiny base has no LDM layout
    single = ["adapter.method=\"dreambooth\"", "output.model_format=\"single-file\""]
    sd2 = load_recipe(None, [f'model.base="{path}"', *single], {"model.prediction_type": "epsilon"})
    assert not [p for p in validate_recipe(sd2).problems if "model_format" in p]
    tiny = validate_recipe(load_recipe(None, single)).problems
    assert any(p.startswith("output.model_format") and "not tiny" in p for p in tiny), tiny


def test_sdxl_round_trip(tmp_path):
    modules = {
        "unet": tiny_unet(SDXL, [32, 64, 64], 96, addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=32 + 6 * 8),
        "vae": tiny_vae(SDXL),
        "text_encoder": tiny_text(SDXL, "text_encoder", 32),
        "text_encoder_2": tiny_text(SDXL, "text_encoder_2", 64, projection=32, seed=4),
    }
    tensors = to_ldm_state_dict(SDXL, modules)
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in tensors
    assert tensors["conditioner.embedders.1.model.text_projection"].shape == (64, 32)
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight" in tensors
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors
    path = tmp_path / "xl.safetensors"
    save_safetensors(path, tensors, None)
    assert check_single_file(path) is SDXL
    loaded = components_from_ldm(SDXL, read_checkpoint(path)[0])
    assert loaded.modules["unet"].config.transformer_layers_per_block == [1, 2, 10]
    for name, module in modules.items():
        _same(module, loaded.modules[name])
    assert loaded.tokenizers["tokenizer_2"].pad_token == "!"


def test_unclassifiable_file_lists_what_was_looked_for(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_safetensors(path, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, None)
    with pytest.raises(TunerError) as err:
        check_single_file(path)
    message = str(err.value)
    for probe in ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                  "conditioner.embedders.1.model.", "cond_stage_model.model.", "cond_stage_model.transformer."):
        assert probe in message
    assert "--lora" in message and str(path) in message


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _Shell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Payload, _Shell])
def test_malicious_ckpt_is_refused_and_never_runs(tmp_path, payload):
    from tuner.models.base import check_base_spec

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": payload(marker)}, ckpt)
    with pytest.raises(TunerError, match="convert-checkpoint"):
        read_checkpoint(ckpt)
    with pytest.raises(TunerError):
        check_base_spec(str(ckpt))
    with pytest.raises(TunerError, match="refused"):
        convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    legacy = tmp_path / "legacy.pt"
    with legacy.open("wb") as fh:
        pickle.dump({"x": payload(marker)}, fh)
    with pytest.raises(TunerError):
        read_checkpoint(legacy)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


class LightningCallback:  # stands for e.g. pytorch_lightning's ModelCheckpoint, pickled by class reference
    def __init__(self):
        self.best = 3


def test_convert_checkpoint_unwraps_state_dict_and_drops_objects(tmp_path, monkeypatch):
    from tuner.cli import main

    ckpt = tmp_path / "model.ckpt"
    tensors = {"model.diffusion_model.a": torch.arange(4.0), "first_stage_model.b": torch.ones(2, 2)}
    torch.save({"state_dict": tensors, "global_step": 7, "callbacks": {"cb": LightningCallback()}}, ckpt)
    with pytest.raises(TunerError, match="convert-checkpoint"):
        read_checkpoint(ckpt)  # weights_only refuses the callback class
    out = tmp_path / "model.safetensors"
    report = convert_checkpoint(ckpt, out)
    assert report.tensors == 2 and any("global_step" in d for d in report.dropped)
    assert any(name.endswith("LightningCallback") for name in report.placeholders)
    loaded, _ = read_checkpoint(out)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    out.unlink()
    assert main(["convert-checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert out.exists()


def test_sample_cli_with_single_file_base(tmp_path, sd15_modules):
    from tuner.cli import main

    path = save_single_file(tmp_path / "m.safetensors", SD15, sd15_modules)
    out = tmp_path / "samples"
    assert main(["sample", "--base", str(path), "--prompt", "a photo of a cat", "--steps", "2",
                 "--size", "64x64", "--out", str(out)]) == 0
    assert list(out.glob("*.png"))
