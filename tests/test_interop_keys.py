"""The key lists tuner writes for the full-size SD1.5 and SDXL topologies, pinned to kohya's own (what
bench/interop_keys.py checks against ComfyUI's, kohya's and diffusers' loaders: zero keys dropped), and
``tuner convert`` on SDXL kohya files (it needs SDXL's module names without a base model).

Models are built on the meta device: only names and shapes matter, and no weight is allocated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuner.adapters.lora import canonical_path, plan_ranks, text_encoder_targets, unet_targets
from tuner.adapters.types import LoraModule, LoraWeights
from tuner.formats.convert import convert_file
from tuner.formats.io import read_safetensors
from tuner.formats.kohya import to_kohya_state_dict
from tuner.formats.lorafile import save_lora
from tuner.formats.metadata import build_lora_metadata
from tuner.formats.skeleton import family_module_keys, kohya_table_for
from tuner.models.families import SD15, SDXL, Family


def _writes_sdxl() -> bool:
    from tuner.formats.kohya import kohya_module_name

    try:
        kohya_module_name(SDXL, "unet:down_blocks.1.attentions.0.proj_in")
    except NotImplementedError:
        return False
    return True


needs_sdxl = pytest.mark.skipif(not _writes_sdxl(), reason="tuner does not write SDXL kohya names yet")
REFERENCE = json.loads((Path(__file__).parent / "data" / "kohya_keys_canonical.json").read_text())


def _meta_models(family: Family) -> dict[str, torch.nn.Module]:
    import transformers
    from diffusers import UNet2DConditionModel

    from tuner.models.single_file import family_config

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(family_config(family, "unet"))}
        for spec in family.text_encoders:
            config = transformers.CLIPTextConfig(**family_config(family, spec.component))
            models[spec.component] = getattr(transformers, spec.model_class)(config)
    return models


def _weights(family: Family, preset: str, device: str = "meta") -> LoraWeights:
    """Rank-4 factors (alpha 1) for every module training adapts with ``preset`` and the text encoders."""
    modules = {}
    for component, model in _meta_models(family).items():
        targets = unet_targets(model, preset) if component == "unet" else text_encoder_targets(model)
        conv = dict(conv_rank=4, conv_alpha=1.0) if preset == "locon" else {}
        for path, (rank, alpha) in plan_ranks(model, targets, rank=4, alpha=1.0, **conv).items():
            w = model.get_submodule(path).weight
            kernel = tuple(w.shape[2:])
            down = torch.full((rank, w.shape[1], *kernel), 0.01, device=device)
            up = torch.full((w.shape[0], rank, *((1, 1) if kernel else ())), 0.02, device=device)
            modules[f"{component}:{canonical_path(component, path)}"] = LoraModule(down, up, alpha)
    return LoraWeights(modules=modules)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,preset,reference",
    [(SD15, "kohya", "sd15_lora"), (SD15, "locon", "sd15_locon"),
     pytest.param(SDXL, "kohya", "sdxl_lora", marks=needs_sdxl),
     pytest.param(SDXL, "locon", "sdxl_locon", marks=needs_sdxl)],
)  # fmt: skip
def test_written_keys_are_kohyas_exactly(family, preset, reference):
    state = to_kohya_state_dict(_weights(family, preset), family, dtype=torch.float32)
    expected = REFERENCE[reference]
    assert sorted(set(state) - set(expected)) == [] and sorted(set(expected) - set(state)) == []
    assert {k: list(v.shape) for k, v in state.items()} == {k: shape for k, (_, shape) in expected.items()}


@pytest.mark.slow
@needs_sdxl
def test_sdxl_name_table_covers_every_kohya_module():
    table = kohya_table_for(SDXL)
    modules = {key.split(".", 1)[0] for key in REFERENCE["sdxl_locon"]}
    assert sorted(modules - set(table)) == []
    assert table["lora_unet_output_blocks_2_2_conv"] == "unet:up_blocks.0.upsamplers.0.conv"
    assert table["lora_te2_text_model_encoder_layers_31_mlp_fc2"] == "text_encoder_2:text_model.encoder.layers.31.mlp.fc2"
    assert len(family_module_keys("sdxl")) > len(modules)


@pytest.mark.slow
@needs_sdxl
def test_sdxl_kohya_file_converts_to_peft_and_back(tmp_path):
    full = _weights(SDXL, "locon", device="cpu")
    keep = [k for k in full.modules if ".4." in k or "upsamplers" in k or k.endswith("layers.31.mlp.fc2")]
    weights = LoraWeights(modules={k: full.modules[k] for k in keep})
    meta = build_lora_metadata(family=SDXL, rank=4, alpha=1.0, output_name="x")
    kohya = tmp_path / "x.safetensors"
    save_lora(kohya, weights, SDXL, dtype=torch.float32, metadata=meta)
    convert_file(kohya, "peft", tmp_path / "x.peft.safetensors")
    convert_file(tmp_path / "x.peft.safetensors", "kohya", tmp_path / "back.safetensors")
    first, _ = read_safetensors(kohya)
    back, _ = read_safetensors(tmp_path / "back.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_") for k in first)  # SDXL: LDM-derived names
    assert set(back) == set(first)
    for key, tensor in first.items():
        assert torch.equal(back[key], tensor), key


def test_tiny_module_names_follow_the_shipped_base(tmp_path, monkeypatch):
    """Converting a ``tiny`` kohya file without a base resolves names against the UNet the install ships:
    a base pretrained with ``--latent-factor 2`` (one more down block) has module names the factor-4
    config lacks, and its LoRAs must still convert."""
    import tuner.models.base as base_module
    from tuner.models.tiny import text_encoder_config, unet_config, vae_config

    configs = {"unet": unet_config(2), "vae": vae_config(2), "text_encoder": text_encoder_config(256, 0, 1)}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setattr(base_module, "TINY_ASSETS", tmp_path)
    family_module_keys.cache_clear()
    try:
        keys = family_module_keys("tiny")
    finally:
        family_module_keys.cache_clear()
    assert "unet:down_blocks.3.resnets.0.conv1" in keys  # the factor-4 UNet has down blocks 0-2 only
    assert "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in keys
    assert not any(k.startswith("unet:down_blocks.0.attentions") for k in keys)  # the new stage has none
