"""Metadata and hashes, diffusers/PEFT keys, detection, save_lora/load_lora and inspect."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime

import pytest
import torch
from safetensors.torch import save

from tuner.adapters.types import LoraModule, LoraWeights
from tuner.errors import FormatError
from tuner.formats.detect import FORMATS, detect_family, detect_format
from tuner.formats.inspect import format_inspection, inspect_file
from tuner.formats.io import read_header, read_safetensors, save_safetensors
from tuner.formats.kohya import kohya_name_table, to_kohya_state_dict
from tuner.formats.lorafile import load_lora, save_lora
from tuner.formats.metadata import (
    MINIMUM_SS_KEYS,
    build_lora_metadata,
    finalize_lora_file,
    legacy_hash,
    read_tuner_block,
    tensor_data_hash,
)
from tuner.formats.peft import from_peft_state_dict, to_peft_state_dict
from tuner.models.families import SD15, TINY

SPECS = {  # canonical key -> (in, out, kernel; 0 = Linear)
    "unet:down_blocks.0.attentions.0.proj_in": (32, 32, 1),
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32, 0),
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (32, 32, 0),
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (128, 32, 0),
    "unet:mid_block.attentions.0.transformer_blocks.0.ff.net.2": (256, 64, 0),
    "unet:up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": (64, 64, 0),
    "text_encoder:text_model.encoder.layers.0.self_attn.q_proj": (128, 128, 0),
    "text_encoder:text_model.encoder.layers.0.self_attn.out_proj": (128, 128, 0),
    "text_encoder:text_model.encoder.layers.1.mlp.fc1": (128, 512, 0),
}
LOCON_SPECS = SPECS | {"unet:down_blocks.0.resnets.0.conv1": (32, 32, 3)}


def make_weights(
    specs=SPECS, rank: int = 4, alpha: float = 2.0, seed: int = 0, conv_alpha: float | None = None
):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key, (fan_in, fan_out, k) in specs.items():
        down = torch.randn((rank, fan_in, k, k) if k else (rank, fan_in), generator=g)
        up = torch.randn((fan_out, rank, 1, 1) if k else (fan_out, rank), generator=g)
        a = conv_alpha if (k == 3 and conv_alpha is not None) else alpha
        modules[key] = LoraModule(down=down, up=up, alpha=a)
    return LoraWeights(modules=modules)


def make_metadata(family=TINY, **overrides):
    args = dict(
        family=family,
        rank=4,
        alpha=2.0,
        network_args={"conv_dim": 4},
        output_name="red_cube",
        training={"ss_steps": "100", "ss_tag_frequency": json.dumps({"10_cube": {"red cube": 3}})},
        tuner_block={"method": "lora", "targets": ["attn", "te"], "recipe_hash": "abc123"},
        trigger_words=["redcube", "toy"],
        prediction_type="epsilon",
        date=datetime.fromisoformat("2025-01-02T03:04:05+00:00"),
    )
    return build_lora_metadata(**(args | overrides))


# ---------------------------------------------------------------- metadata and hashes


def test_metadata_minimum_keys_all_strings():
    meta = make_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for key in MINIMUM_SS_KEYS:
        assert key in meta
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4"}
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "100"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "red_cube"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.date"] == "2025-01-02T03:04:05+00:00"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.trigger_phrase"] == "redcube, toy"
    block = read_tuner_block(meta)
    assert block == {
        "version": 1,
        "family": "tiny",
        "method": "lora",
        "targets": ["attn", "te"],
        "recipe_hash": "abc123",
    }


def test_metadata_rejects_bad_training_fields():
    with pytest.raises(ValueError, match="ss_"):
        make_metadata(training={"steps": "1"})
    with pytest.raises(ValueError, match="redefine"):
        make_metadata(training={"ss_network_dim": "8"})
    with pytest.raises(TypeError):
        make_metadata(training={"ss_steps": 100})
    with pytest.raises(ValueError, match="family"):
        make_metadata(tuner_block={"family": "sdxl"})
    with pytest.raises(ValueError):
        make_metadata(rank=0)


def _independent_data_hash(path) -> str:
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return hashlib.sha256(blob[8 + n :]).hexdigest()


def test_sshs_hash_matches_final_file_and_kohya_recipe(tmp_path):
    weights = make_weights(rank=16)
    weights.modules["unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = LoraModule(
        torch.randn(16, 40000), torch.randn(32, 16), 16.0
    )  # > 1 MiB of data so that the legacy hash window holds data
    path = tmp_path / "lora.safetensors"
    meta = make_metadata()
    returned = save_lora(path, weights, TINY, dtype=torch.float16, metadata=meta)
    _, stored = read_safetensors(path)
    assert stored["sshs_model_hash"] == returned == _independent_data_hash(path)
    assert stored["modelspec.hash_sha256"] == "0x" + returned
    # kohya's recipe: serialise with only the ss_* metadata
    tensors = to_kohya_state_dict(weights, TINY, dtype=torch.float16)
    ss = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = struct.unpack("<Q", ss[:8])[0]
    assert tensor_data_hash(tensors, meta) == hashlib.sha256(ss[8 + n :]).hexdigest() == returned
    assert (
        stored["sshs_legacy_hash"]
        == legacy_hash(tensors, meta)
        == hashlib.sha256(ss[0x100000:0x110000]).hexdigest()[:8]
    )


def test_finalize_replaces_stale_hashes_and_depends_on_data():
    weights = make_weights()
    tensors = to_kohya_state_dict(weights, TINY)
    meta = finalize_lora_file(tensors, {**make_metadata(), "sshs_model_hash": "stale"})
    assert meta["sshs_model_hash"] != "stale" and len(meta["sshs_model_hash"]) == 64
    changed = dict(tensors)
    key = next(k for k in changed if k.endswith("lora_up.weight"))
    changed[key] = changed[key] + 1
    assert finalize_lora_file(changed, meta)["sshs_model_hash"] != meta["sshs_model_hash"]


# ---------------------------------------------------------------- diffusers / PEFT


def _deltas(weights: LoraWeights) -> dict[str, torch.Tensor]:
    return {k: m.delta((m.up.shape[0], *m.down.shape[1:])) for k, m in weights.modules.items()}


def test_peft_keys_and_round_trip_preserve_delta():
    weights = make_weights(specs=LOCON_SPECS, alpha=8.0)
    sd, meta = to_peft_state_dict(weights)
    assert meta == {"format": "pt"}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    assert len(sd) == 2 * len(weights.modules)
    back = from_peft_state_dict(sd)
    assert back.modules.keys() == weights.modules.keys()
    expected = _deltas(weights)
    for key, delta in _deltas(back).items():
        assert back.modules[key].alpha == back.modules[key].rank  # what diffusers assumes
        assert torch.equal(back.modules[key].down, weights.modules[key].down)
        torch.testing.assert_close(delta, expected[key])


def test_peft_reads_diffusers_saved_naming_made_by_diffusers():
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    weights = make_weights()
    sd, _ = to_peft_state_dict(weights)
    converted = convert_state_dict_to_diffusers(sd)
    assert any(".lora.down.weight" in k for k in converted) and any(
        "lora_linear_layer" in k for k in converted
    )
    assert detect_format(converted) == "diffusers-old"
    back = from_peft_state_dict(converted)
    expected = _deltas(weights)
    for key, delta in _deltas(back).items():
        torch.testing.assert_close(delta, expected[key])


def test_peft_reads_attention_processor_naming_and_alpha_keys():
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    sd = {
        f"{prefix}.to_q_lora.down.weight": down,
        f"{prefix}.to_q_lora.up.weight": up,
        f"{prefix}.to_out_lora.down.weight": down,
        f"{prefix}.to_out_lora.up.weight": up,
        "text_encoder.encoder.layers.0.self_attn.to_k_lora.down.weight": down,  # no text_model level
        "text_encoder.encoder.layers.0.self_attn.to_k_lora.up.weight": up,
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": down,
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": up,
        "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(2.0),
    }
    assert detect_format(sd) == "diffusers-attn-processor"
    weights = from_peft_state_dict(sd)
    assert set(weights.modules) == {
        "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoder:text_model.encoder.layers.0.self_attn.k_proj",
        "unet:mid_block.attentions.0.proj_in",
    }
    assert weights.modules["unet:mid_block.attentions.0.proj_in"].alpha == 2.0
    assert weights.modules["unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 4.0


def test_peft_adapter_metadata_alpha_and_unknown_keys():
    sd, _ = to_peft_state_dict(make_weights())
    weights = from_peft_state_dict(sd, adapter_metadata={"unet.lora_alpha": 8, "unet.r": 4})
    assert {m.alpha for k, m in weights.modules.items() if k.startswith("unet:")} == {8.0}
    assert {m.alpha for k, m in weights.modules.items() if k.startswith("text_encoder:")} == {4.0}
    with pytest.raises(FormatError, match="vae.decoder.lora_A.weight"):
        from_peft_state_dict(sd | {"vae.decoder.lora_A.weight": torch.zeros(1)})


# ---------------------------------------------------------------- detection


def _keys_of(fmt: str) -> list[str]:
    kohya = to_kohya_state_dict(make_weights(), SD15)
    if fmt == "kohya":
        return list(kohya)
    if fmt == "kohya-locon":
        return list(to_kohya_state_dict(make_weights(LOCON_SPECS), SD15))
    if fmt == "kohya-bundle":
        return [*kohya, "bundle_emb.redcube.string_to_param.*"]
    if fmt == "peft":
        return list(to_peft_state_dict(make_weights())[0])
    if fmt == "diffusers-old":
        return ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight",
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"]  # fmt: skip
    if fmt == "diffusers-attn-processor":
        return ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"]  # fmt: skip
    if fmt == "embedding-kohya":
        return ["emb_params"]
    if fmt == "embedding-sdxl":
        return ["clip_g", "clip_l"]
    if fmt == "embedding-diffusers":
        return ["<redcube>"]
    if fmt == "lycoris-loha":
        return [
            "lora_unet_x.hada_w1_a",
            "lora_unet_x.hada_w1_b",
            "lora_unet_x.hada_w2_a",
            "lora_unet_x.alpha",
        ]
    if fmt == "lycoris-lokr":
        return ["lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2", "lora_unet_x.alpha"]
    if fmt == "dora":
        return [*kohya, "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"]
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", [name for name, _ in FORMATS])
def test_detect_each_format(fmt):
    assert detect_format(_keys_of(fmt)) == fmt


def test_detect_locon_from_shapes_and_failure_message():
    sd = to_kohya_state_dict(make_weights({"unet:x_blocks.0.conv": (8, 8, 3), **SPECS}), SD15)
    assert detect_format(sd, {k: tuple(v.shape) for k, v in sd.items()}) == "kohya-locon"
    keys = [f"model.layer{i}.weight" for i in range(12)]
    with pytest.raises(FormatError) as err:
        detect_format(keys)
    message = str(err.value)
    assert "kohya" in message and "peft" in message and "lycoris-loha" in message
    assert "model.layer0.weight" in message and "model.layer7.weight" not in message.split("more")[-1]
    assert message.count("model.layer") == 8


def test_detect_family():
    assert (
        detect_family(
            {"tuner": json.dumps({"family": "tiny"}), "ss_base_model_version": "sdxl_base_v1-0"}, {}
        )
        == "tiny"
    )
    assert detect_family({"ss_base_model_version": "sd_v1"}, {}) == "sd15"
    assert detect_family({"ss_base_model_version": "sdxl_base_v1-0"}, {}) == "sdxl"
    assert detect_family({"ss_base_model_version": "sd_v2_v"}, {}) == "sd2"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    assert detect_family({}, {te: (4, 768)}) == "sd15"
    assert detect_family({}, {te: (4, 1024)}) == "sd2"
    assert detect_family({}, {te: (4, 128)}) == "tiny"
    assert detect_family({"ss_base_model_version": "sd_v1"}, {te: (4, 128)}) == "tiny"
    assert (
        detect_family({}, {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)})
        == "sdxl"
    )
    assert (
        detect_family(
            {}, {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)}
        )
        == "sdxl"
    )
    assert detect_family({}, {"emb_params": (2, 1024)}) == "sd2"
    assert detect_family({}, {"something": (3,)}) is None


# ---------------------------------------------------------------- save_lora / load_lora / inspect


def test_save_and_load_lora_round_trip(tmp_path):
    weights = make_weights(alpha=8.0)
    path = tmp_path / "lora.safetensors"
    save_lora(path, weights, TINY, dtype=torch.float32, metadata=make_metadata())
    table = kohya_name_table(TINY, weights.modules)
    back = load_lora(path, name_table=table)
    assert back.metadata["ss_output_name"] == "red_cube" and "sshs_model_hash" in back.metadata
    for key, module in weights.modules.items():
        assert torch.equal(back.modules[key].down, module.down) and torch.equal(
            back.modules[key].up, module.up
        )
        assert back.modules[key].alpha == 8.0
    with pytest.raises(ValueError, match="name_table"):
        load_lora(path)
    # a table for a model lacking some modules: strict fails, lenient loads the rest
    partial = kohya_name_table(TINY, [k for k in weights.modules if k.startswith("unet:")])
    with pytest.raises(FormatError, match="lora_te_text_model"):
        load_lora(path, name_table=partial)
    assert all(k.startswith("unet:") for k in load_lora(path, name_table=partial, lenient=True).modules)


def test_load_lora_reads_peft_files_and_refuses_others(tmp_path):
    weights = make_weights()
    sd, meta = to_peft_state_dict(weights)
    peft_path = tmp_path / "pytorch_lora_weights.safetensors"
    save_safetensors(peft_path, sd, meta)
    back = load_lora(peft_path)
    assert back.modules.keys() == weights.modules.keys() and back.metadata == {"format": "pt"}
    emb = tmp_path / "emb.safetensors"
    save_safetensors(emb, {"emb_params": torch.zeros(2, 128)}, {})
    with pytest.raises(FormatError, match="embedding-kohya"):
        load_lora(emb)


def test_inspect_kohya_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, make_weights(alpha=2.0), TINY, metadata=make_metadata())
    info = inspect_file(path)
    assert info["format"] == "kohya" and info["method"] == "lora" and info["family"] == "tiny"
    assert info["modules"] == len(SPECS) and info["tensors"] == 3 * len(SPECS)
    assert info["targets"] == {
        "text_encoder": 3,
        "unet.down_blocks.0": 4,
        "unet.mid_block": 1,
        "unet.up_blocks.1": 1,
    }
    assert info["layers"]["to_q"] == 1 and info["layers"]["fc1"] == 1 and info["layers"]["proj_in"] == 1
    assert info["rank"] == 4 and info["alpha"] == 2.0 and "rank_alpha" not in info
    assert info["dtype"] == "F16"
    assert info["metadata"]["tuner"]["method"] == "lora"
    assert info["metadata"]["ss_tag_frequency"] == {"10_cube": {"red cube": 3}}
    assert info["metadata"]["modelspec.title"] == "red_cube"
    assert info["hashes"]["matches"] is True and info["hashes"]["modelspec_hash_matches"] is True
    text = format_inspection(info)
    assert "kohya" in text and "rank: 4" in text and "matches" in text and "unet.down_blocks.0 (4)" in text

    # flip one data byte: the stored hash no longer matches
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert inspect_file(path)["hashes"]["matches"] is False


def test_inspect_locon_with_varying_alpha_and_unknown_files(tmp_path):
    path = tmp_path / "locon.safetensors"
    save_lora(path, make_weights(LOCON_SPECS, alpha=2.0, conv_alpha=1.0), SD15, metadata={"x": "y"})
    info = inspect_file(path)
    assert info["format"] == "kohya-locon" and info["method"] == "locon"
    assert info["family"] == "tiny"  # no metadata: the 128-wide text encoder decides
    assert info["rank"] == 4 and info["alpha"] is None
    assert info["rank_alpha"]["lora_unet_down_blocks_0_resnets_0_conv1"] == {"rank": 4, "alpha": 1.0}
    assert "rank/alpha vary" in format_inspection(info)

    odd = tmp_path / "odd.safetensors"
    save_safetensors(odd, {"model.a": torch.zeros(2), "model.b": torch.zeros(2)}, {})
    info = inspect_file(odd)
    assert info["format"] == "unknown" and "tried" in info["problem"] and info["hashes"]["matches"] is None
    assert "unknown" in format_inspection(info)
    _, shapes = read_header(odd)
    assert shapes["model.a"] == ("F32", (2,))
