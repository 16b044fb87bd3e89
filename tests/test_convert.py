"""tuner convert: LoRA files between kohya, diffusers and PEFT layouts (alphas kept, metadata carried), SD1
files with LDM UNet names to diffusers names, and embeddings between kohya, diffusers and A1111 layouts."""

from __future__ import annotations

import pytest
import torch

from tuner.adapters.types import LoraModule, LoraWeights
from tuner.cli import main
from tuner.errors import TunerError
from tuner.formats.convert import convert_file, read_lora_file
from tuner.formats.detect import detect_format
from tuner.formats.embeddings import read_embedding, save_kohya_embedding
from tuner.formats.inspect import inspect_file
from tuner.formats.io import read_safetensors, save_safetensors
from tuner.formats.lorafile import save_lora
from tuner.formats.metadata import build_lora_metadata, read_tuner_block
from tuner.models.families import TINY

MODULES = {  # canonical key -> base weight shape (tiny base)
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (64, 128),
    "unet:down_blocks.0.attentions.0.proj_in": (64, 64, 1, 1),
    "unet:down_blocks.0.resnets.0.conv1": (64, 64, 3, 3),
    "text_encoder:text_model.encoder.layers.0.self_attn.q_proj": (128, 128),
    "text_encoder:text_model.encoder.layers.1.mlp.fc1": (512, 128),
}


def ours(path, alpha=3.0, rank=4, dtype=torch.float16, conv_alpha=1.0):
    """A LoRA file as tuner's trainer writes it (kohya layout, tuner metadata); alpha != rank."""
    g = torch.Generator().manual_seed(0)
    modules = {}
    for key, shape in MODULES.items():
        down = torch.randn(rank, shape[1], *shape[2:], generator=g) * 0.1
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        modules[key] = LoraModule(down, up, conv_alpha if len(shape) == 4 and shape[2] == 3 else alpha)
    weights = LoraWeights(modules)
    meta = build_lora_metadata(family=TINY, rank=rank, alpha=alpha, output_name="ours",
                               network_args={"conv_dim": rank, "conv_alpha": conv_alpha},
                               training={"ss_steps": "100"}, trigger_words=["sks"])
    save_lora(path, weights, TINY, dtype=dtype, metadata=meta)
    return weights


def deltas(weights):
    return {k: m.delta(MODULES[k]) for k, m in weights.modules.items()}


def test_round_trip_ours_kohya_diffusers_kohya_is_identical(tmp_path):
    ours(tmp_path / "ours.safetensors")
    original, meta = read_safetensors(tmp_path / "ours.safetensors")
    convert_file(tmp_path / "ours.safetensors", "kohya", tmp_path / "k1.safetensors")
    convert_file(tmp_path / "k1.safetensors", "diffusers", tmp_path / "d.safetensors")
    convert_file(tmp_path / "d.safetensors", "peft", tmp_path / "p.safetensors")
    convert_file(tmp_path / "p.safetensors", "kohya", tmp_path / "k2.safetensors")
    for name in ("k1", "k2"):
        tensors, new_meta = read_safetensors(tmp_path / f"{name}.safetensors")
        assert tensors.keys() == original.keys()
        for key, value in original.items():
            assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
        assert new_meta["sshs_model_hash"] == meta["sshs_model_hash"]  # same tensors, same hash
        for key in ("ss_network_alpha", "ss_steps", "modelspec.trigger_phrase", "ss_output_name"):
            assert new_meta[key] == meta[key]
        assert "format" not in new_meta

    # the diffusers file: diffusers naming, no alpha tensors, the scale baked into lora_B (in fp32)
    d, d_meta = read_safetensors(tmp_path / "d.safetensors")
    assert detect_format(d) == "diffusers-old" and not any(k.endswith(".alpha") for k in d)
    assert d_meta["format"] == "pt" and d_meta["ss_steps"] == "100"
    assert read_tuner_block(d_meta)["baked_alphas"] == {"alpha": 3.0, "modules": {
        "unet:down_blocks.0.resnets.0.conv1": 1.0}, "dtype": "fp16"}
    assert d["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"].dtype == torch.float32
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in d
    assert detect_format(read_safetensors(tmp_path / "p.safetensors")[0]) == "peft"
    # what a loader that knows nothing of tuner's record (alpha = rank) computes equals the true delta
    from tuner.formats.peft import from_peft_state_dict

    naive = from_peft_state_dict(d)
    truth, _, _ = read_lora_file(tmp_path / "ours.safetensors")
    for key, delta in deltas(truth).items():
        torch.testing.assert_close(naive.modules[key].delta(MODULES[key]), delta, atol=1e-6, rtol=1e-4)


def test_peft_file_loads_in_diffusers_with_the_same_delta(tmp_path):
    from diffusers import UNet2DConditionModel

    from tuner.models.tiny import UNET_CONFIG

    weights = ours(tmp_path / "ours.safetensors", dtype=torch.float32)
    convert_file(tmp_path / "ours.safetensors", "peft", tmp_path / "p.safetensors")
    sd, _ = read_safetensors(tmp_path / "p.safetensors")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    before = {k: unet.get_submodule(k.split(":", 1)[1]).weight.detach().clone() for k in MODULES if k.startswith("unet:")}
    unet.load_lora_adapter({k: v for k, v in sd.items() if k.startswith("unet.")}, prefix="unet", adapter_name="x")
    unet.fuse_lora()
    for key, w0 in before.items():
        path = key.split(":", 1)[1]
        layer = unet.get_submodule(path)
        fused = getattr(layer, "base_layer", layer).weight.detach()
        torch.testing.assert_close(fused - w0, weights.modules[key].delta(w0.shape), atol=1e-6, rtol=1e-4)


def test_sd1_ldm_names_become_diffusers_names(tmp_path):
    ldm_to_diffusers = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_11_0_out_layers_3": "lora_unet_down_blocks_3_resnets_1_conv2",
        "lora_unet_input_blocks_3_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_output_blocks_5_1_proj_in": "lora_unet_up_blocks_1_attentions_2_proj_in",
        "lora_unet_output_blocks_2_1_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k":
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_middle_block_2_emb_layers_1": "lora_unet_mid_block_resnets_1_time_emb_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    }  # fmt: skip
    sd = {}
    for i, name in enumerate(ldm_to_diffusers):
        sd[f"{name}.lora_down.weight"] = torch.full((2, 8), float(i)).half()
        sd[f"{name}.lora_up.weight"] = torch.full((8, 2), 1.0 + i).half()
        sd[f"{name}.alpha"] = torch.tensor(1.0).half()
    src = tmp_path / "ldm.safetensors"
    save_safetensors(src, sd, {"ss_base_model_version": "sd_v1", "ss_network_dim": "2"})
    info = inspect_file(src)
    assert info["loaders"]["diffusers"]["loads"] == "no" and info["loaders"]["ComfyUI"]["loads"] == "yes"
    result = convert_file(src, "kohya", tmp_path / "out.safetensors")
    assert result.source_format in ("kohya", "kohya-locon") and result.modules == len(ldm_to_diffusers)
    out, meta = read_safetensors(tmp_path / "out.safetensors")
    for ldm, diffusers_name in ldm_to_diffusers.items():
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert torch.equal(out[f"{diffusers_name}.{part}"], sd[f"{ldm}.{part}"])
    assert len(out) == len(sd) and meta["ss_base_model_version"] == "sd_v1"
    assert "ss_network_module" in meta  # kohya's minimum keys were added
    assert inspect_file(tmp_path / "out.safetensors")["loaders"]["diffusers"]["loads"] == "yes"


def test_embeddings_between_layouts(tmp_path):
    vectors = torch.randn(3, 128)
    src = tmp_path / "pinkish.safetensors"
    save_kohya_embedding(src, vectors)
    convert_file(src, "diffusers", tmp_path / "d.safetensors", token="<pink>")
    assert read_embedding(tmp_path / "d.safetensors").token == "<pink>"
    convert_file(tmp_path / "d.safetensors", "a1111-pt", tmp_path / "pink.pt")
    a1111 = torch.load(tmp_path / "pink.pt", weights_only=True)
    assert a1111["name"] == "<pink>" and torch.equal(a1111["string_to_param"]["*"], vectors)
    result = convert_file(tmp_path / "pink.pt", "kohya", tmp_path / "back.safetensors")
    back = read_embedding(tmp_path / "back.safetensors")
    assert back.format == "kohya" and torch.equal(back.vectors["text_encoder"], vectors)
    assert "modelspec.architecture" in read_safetensors(tmp_path / "back.safetensors")[1]  # tiny, from the width
    assert any("file name" in note for note in result.notes)

    xl = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    save_safetensors(tmp_path / "xl.safetensors", xl, {})
    result = convert_file(tmp_path / "xl.safetensors", "diffusers", tmp_path / "xl_d.safetensors", token="tok")
    assert [p.name for p in result.outputs] == ["xl_d.safetensors", "xl_d_2.safetensors"]
    assert torch.equal(read_safetensors(tmp_path / "xl_d_2.safetensors")[0]["tok"], xl["clip_g"])
    convert_file(tmp_path / "xl.safetensors", "a1111-pt", tmp_path / "xl.pt")
    again = read_embedding(tmp_path / "xl.pt")
    assert again.is_sdxl and torch.equal(again.vectors["clip_l"], xl["clip_l"])


def test_errors_and_cli(tmp_path, capsys):
    ours(tmp_path / "ours.safetensors")
    with pytest.raises(TunerError, match="a LoRA converts to kohya, diffusers, peft"):
        convert_file(tmp_path / "ours.safetensors", "a1111-pt", tmp_path / "x.pt")
    with pytest.raises(TunerError, match="is the input file"):
        convert_file(tmp_path / "ours.safetensors", "kohya", tmp_path / "ours.safetensors")
    lokr = tmp_path / "lokr.safetensors"
    save_safetensors(lokr, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1": torch.ones(8, 8),
                            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2": torch.ones(8, 8)},
                     {"ss_base_model_version": "sd_v1"})
    with pytest.raises(TunerError, match="lokr modules; convert writes plain LoRA"):
        convert_file(lokr, "kohya", tmp_path / "x.safetensors", family="tiny")
    assert main(["convert", str(tmp_path / "ours.safetensors"), "--to", "peft", "--out",
                 str(tmp_path / "p.safetensors"), "--save-dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "kohya-locon -> peft, 6 modules" in out
    p, _ = read_safetensors(tmp_path / "p.safetensors")
    assert {t.dtype for t in p.values()} == {torch.float16}
    assert main(["convert", str(tmp_path / "missing.safetensors"), "--to", "kohya", "--out", "x"]) == 2
