"""kohya naming against kohya's own reference names, kohya round trips, and the LDM name table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tuner.adapters.types import LoraModule, LoraWeights
from tuner.errors import FormatError
from tuner.formats.kohya import (
    from_kohya_state_dict,
    kohya_module_name,
    kohya_name_table,
    to_kohya_state_dict,
)
from tuner.formats.ldm import SD1_LAYOUT, SDXL_LAYOUT, block_pairs, to_diffusers_path, to_ldm_path
from tuner.models.families import SD15, SDXL, TINY

REFERENCE = Path(__file__).parent / "data" / "kohya_keys_canonical.json"

# kohya networks/lora.py target classes (FORMATS.md §1.3).
UNET_CLASSES = {"Transformer2DModel"}
LOCON_CLASSES = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
TE_CLASSES = {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}


def _targets(root: nn.Module, classes: set[str]) -> dict[str, nn.Module]:
    """Every Linear/Conv2d inside a module whose class is in ``classes`` (kohya's rule), by dotted path."""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                found[f"{name}.{child_name}" if name else child_name] = child
    return found


@pytest.fixture(scope="module")
def sd15_modules() -> dict[str, dict[str, nn.Module]]:
    """Canonical key -> live module for the SD1.5 topology, built on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )

    def te_key(path: str) -> str:
        # transformers >= 5 dropped the text_model level from CLIPTextModel; canonical keys always have it.
        return "text_encoder:" + (path if path.startswith("text_model.") else f"text_model.{path}")

    te_modules = {te_key(p): m for p, m in _targets(te, TE_CLASSES).items()}
    lora = {f"unet:{p}": m for p, m in _targets(unet, UNET_CLASSES).items()} | te_modules
    locon = lora | {f"unet:{p}": m for p, m in _targets(unet, LOCON_CLASSES).items()}
    return {"sd15_lora": lora, "sd15_locon": locon}


def _weights_for(modules: dict[str, nn.Module], rank: int, alpha: float = 4.0) -> LoraWeights:
    out: dict[str, LoraModule] = {}
    for key, m in modules.items():
        if isinstance(m, nn.Conv2d):
            down = torch.zeros(rank, m.in_channels, *m.kernel_size)
            up = torch.zeros(m.out_channels, rank, 1, 1)
        else:
            down = torch.zeros(rank, m.in_features)
            up = torch.zeros(m.out_features, rank)
        out[key] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraWeights(modules=out)


@pytest.mark.parametrize("case", ["sd15_lora", "sd15_locon"])
def test_sd15_names_and_shapes_equal_kohya_reference(sd15_modules, case):
    reference = json.loads(REFERENCE.read_text())[case]
    expected = {k: tuple(shape) for k, (_, shape) in reference.items()}
    sd = to_kohya_state_dict(_weights_for(sd15_modules[case], rank=4), SD15, dtype=torch.float32)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert set(got) == set(expected), (
        sorted(set(got) - set(expected))[:5],
        sorted(set(expected) - set(got))[:5],
    )
    assert got == expected
    assert {str(v.dtype) for v in sd.values()} == {"torch.float32"}


def test_kohya_module_name_examples():
    assert (
        kohya_module_name(SD15, "unet:down_blocks.0.attentions.0.proj_in")
        == "lora_unet_down_blocks_0_attentions_0_proj_in"
    )
    assert (
        kohya_module_name(SD15, "text_encoder:text_model.encoder.layers.0.self_attn.q_proj")
        == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert (
        kohya_module_name(TINY, "unet:mid_block.attentions.0.proj_out")
        == "lora_unet_mid_block_attentions_0_proj_out"
    )


def test_sdxl_unet_names_are_ldm_derived():
    assert (
        kohya_module_name(SDXL, "unet:down_blocks.1.attentions.0.proj_in")
        == "lora_unet_input_blocks_4_1_proj_in"
    )
    assert (
        kohya_module_name(SDXL, "text_encoder_2:text_model.encoder.layers.31.mlp.fc2")
        == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    )
    table = kohya_name_table(SDXL, ["unet:up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v"])
    assert table["lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v"] == table[
        "lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn2_to_v"]  # diffusers name: read alias
    no_layout = dataclasses.replace(SD15, name="other", unet_naming="ldm")
    with pytest.raises(ValueError, match="no LDM layout"):
        kohya_module_name(no_layout, "unet:down_blocks.1.attentions.0.proj_in")


def test_component_outside_family_is_an_error():
    with pytest.raises(FormatError, match="text_encoder_2"):
        kohya_module_name(SD15, "text_encoder_2:text_model.encoder.layers.0.self_attn.q_proj")


def test_name_table_rejects_collisions():
    with pytest.raises(FormatError, match="both"):
        kohya_name_table(SD15, ["unet:a.b_c", "unet:a_b.c"], aliases=False)


def _random_weights(seed: int = 0, alpha: float = 2.0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    specs = {
        "unet:down_blocks.0.attentions.0.proj_in": (8, 8, 1),
        "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (16, 8, 0),
        "unet:down_blocks.0.resnets.0.conv1": (8, 8, 3),
        "text_encoder:text_model.encoder.layers.0.self_attn.q_proj": (16, 16, 0),
    }
    modules = {}
    for key, (fan_in, fan_out, k) in specs.items():
        down_shape = (4, fan_in, k, k) if k else (4, fan_in)
        up_shape = (fan_out, 4, 1, 1) if k else (fan_out, 4)
        modules[key] = LoraModule(
            torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g), alpha
        )
    return LoraWeights(modules=modules)


def test_kohya_round_trip_is_exact():
    weights = _random_weights()
    sd = to_kohya_state_dict(weights, SD15, dtype=torch.float32)
    back, ignored = from_kohya_state_dict(sd, kohya_name_table(SD15, weights.modules))
    assert ignored == []
    assert back.modules.keys() == weights.modules.keys()
    for key, module in weights.modules.items():
        assert torch.equal(back.modules[key].down, module.down)
        assert torch.equal(back.modules[key].up, module.up)
        assert back.modules[key].alpha == module.alpha


def test_kohya_fp16_casts_every_tensor_and_alpha_is_0dim():
    weights = _random_weights(alpha=8.0)
    sd = to_kohya_state_dict(weights, SD15)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert len(alphas) == 4 and all(v.shape == () and float(v) == 8.0 for v in alphas.values())
    back, _ = from_kohya_state_dict(sd, kohya_name_table(SD15, weights.modules))
    key = "unet:down_blocks.0.resnets.0.conv1"
    assert torch.equal(back.modules[key].down, weights.modules[key].down.half())


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), 1e-9, 1e6])
def test_alpha_never_written_as_zero_or_negative(alpha):
    with pytest.raises(ValueError, match="alpha"):
        to_kohya_state_dict(_random_weights(alpha=alpha), SD15)


def test_missing_alpha_means_rank():
    weights = _random_weights(alpha=1.0)
    sd = {k: v for k, v in to_kohya_state_dict(weights, SD15).items() if not k.endswith(".alpha")}
    back, _ = from_kohya_state_dict(sd, kohya_name_table(SD15, weights.modules))
    assert {m.alpha for m in back.modules.values()} == {4.0}


def test_unknown_keys_listed_in_one_error_or_returned_when_lenient():
    weights = _random_weights()
    sd = to_kohya_state_dict(weights, SD15)
    extra = {f"lora_unet_nonexistent_{i:02d}.lora_down.weight": torch.zeros(1) for i in range(25)}
    extra["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"] = torch.zeros(1)
    table = kohya_name_table(SD15, weights.modules)
    with pytest.raises(FormatError) as err:
        from_kohya_state_dict(sd | extra, table)
    message = str(err.value)
    assert "26 problem(s)" in message
    assert "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale" in message
    assert "lora_unet_nonexistent_00.lora_down.weight" in message
    assert "and 6 more" in message
    back, ignored = from_kohya_state_dict(sd | extra, table, lenient=True)
    assert sorted(ignored) == sorted(extra)
    assert back.modules.keys() == weights.modules.keys()


def test_incomplete_module_is_a_problem():
    weights = _random_weights()
    sd = to_kohya_state_dict(weights, SD15)
    del sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    table = kohya_name_table(SD15, weights.modules)
    with pytest.raises(FormatError, match="missing lora_up.weight"):
        from_kohya_state_dict(sd, table)
    back, ignored = from_kohya_state_dict(sd, table, lenient=True)
    assert "unet:down_blocks.0.resnets.0.conv1" not in back.modules
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in ignored


# FORMATS.md §1.5 (SD1) and §1.4 (SDXL LoCon names) examples.
SD1_PAIRS = [
    ("down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in"),
    ("down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
    (
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q",
        "output_blocks.5.1.transformer_blocks.0.attn1.to_q",
    ),
    ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
    ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.2.upsamplers.0.conv", "output_blocks.8.2.conv"),
    ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
    ("conv_in", "input_blocks.0.0"),
]
SDXL_PAIRS = [
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
    (
        "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q",
        "input_blocks.7.1.transformer_blocks.9.attn1.to_q",
    ),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    (
        "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "output_blocks.3.1.transformer_blocks.1.attn2.to_k",
    ),
]


@pytest.mark.parametrize(("layout", "pairs"), [(SD1_LAYOUT, SD1_PAIRS), (SDXL_LAYOUT, SDXL_PAIRS)])
def test_ldm_table_examples(layout, pairs):
    for diffusers_path, ldm_path in pairs:
        assert to_ldm_path(layout, diffusers_path) == ldm_path
        assert to_diffusers_path(layout, ldm_path) == diffusers_path
    ldm_prefixes = [p.ldm for p in block_pairs(layout)]
    assert len(ldm_prefixes) == len(set(ldm_prefixes))
    with pytest.raises(ValueError):
        to_ldm_path(layout, "down_blocks.9.resnets.0.conv1")


def test_ldm_named_sd1_kohya_keys_map_to_diffusers_modules(sd15_modules):
    keys = list(sd15_modules["sd15_locon"])
    table = kohya_name_table(SD15, keys)
    expected = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "lora_unet_input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    }
    for name, path in expected.items():
        assert table[name] == f"unet:{path}"
    # every UNet module of the LoCon set has exactly one LDM alias, so LDM-named files resolve completely
    ldm_names = [
        n
        for n in table
        if n.startswith("lora_unet_")
        and not n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
    ]
    assert len(ldm_names) == sum(k.startswith("unet:") for k in keys) == 278


def test_ldm_named_sd1_file_reads_back_to_the_same_weights():
    weights = _random_weights()
    sd = to_kohya_state_dict(weights, SD15, dtype=torch.float32)
    renamed = {
        k.replace("lora_unet_down_blocks_0_attentions_0_", "lora_unet_input_blocks_1_1_")
        .replace("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_input_blocks_1_0_in_layers_2")
        .replace("lora_te_text_model_", "lora_te1_text_model_"): v
        for k, v in sd.items()
    }
    assert renamed.keys() != sd.keys()
    back, ignored = from_kohya_state_dict(renamed, kohya_name_table(SD15, weights.modules))
    assert ignored == [] and back.modules.keys() == weights.modules.keys()
    for key, module in weights.modules.items():
        assert torch.equal(back.modules[key].up, module.up)


def test_same_module_under_two_names_is_an_error():
    weights = _random_weights()
    sd = to_kohya_state_dict(weights, SD15)
    sd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = sd[
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    ]
    sd["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"] = sd[
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
    ]
    with pytest.raises(FormatError, match="same module"):
        from_kohya_state_dict(sd, kohya_name_table(SD15, weights.modules))


def test_te_names_without_text_model_level_are_accepted():
    weights = _random_weights()
    table = kohya_name_table(SD15, weights.modules)
    assert (
        table["lora_te_encoder_layers_0_self_attn_q_proj"]
        == "text_encoder:text_model.encoder.layers.0.self_attn.q_proj"
    )
    assert "lora_te_encoder_layers_0_self_attn_q_proj" not in kohya_name_table(
        SD15, weights.modules, aliases=False
    )


@pytest.mark.parametrize("case", ["sd15_lora", "sd15_locon"])
def test_diffusers_kohya_converter_finds_the_same_modules(sd15_modules, case):
    """Oracle: diffusers' own kohya reader (lora_state_dict) names exactly our modules."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from tuner.formats.peft import from_peft_state_dict

    modules = sd15_modules[case]
    sd = to_kohya_state_dict(_weights_for(modules, rank=4), SD15, dtype=torch.float32)
    converted, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(sd))
    assert len(network_alphas) == len(modules)
    back = from_peft_state_dict(converted)
    assert set(back.modules) == set(modules)
