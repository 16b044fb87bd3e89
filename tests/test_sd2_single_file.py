"""SD2.x single files written by tuner (LDM layout, OpenCLIP-H text encoder under ``cond_stage_model.model.``
with fused q/k/v) on the small SD2 topology: the key set of the original checkpoints (24 resblocks,
text_projection, logit_scale), diffusers -> single file -> diffusers gives identical tensors, diffusers' own
``from_single_file`` reads the file, and ``tuner merge --format single-file`` and DreamBooth's single-file
export use it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_recipe

from tuner.formats.io import read_header, read_safetensors
from tuner.models.base import check_base_spec, export_base, load_base
from tuner.models.single_file import save_single_file
from tuner.models.small import small_base

TE = "cond_stage_model.model."


def quiet(*_):
    pass


def same_components(a, b) -> None:
    for name, module in a.components.items():
        theirs = b.components[name].state_dict()
        mine = module.state_dict()
        assert set(mine) == set(theirs), name
        for key, tensor in mine.items():
            assert torch.equal(tensor, theirs[key]), f"{name}.{key}"


@pytest.mark.parametrize("family", ["sd2", "sd2v"])
def test_sd2_single_file_round_trip_and_layout(tmp_path, family):
    base = small_base(family)
    path = save_single_file(
        tmp_path / "m.safetensors",
        base.family,
        base.components,
        dtype=None,
        prediction_type=base.prediction_type,
    )
    metadata, header = read_header(path)
    assert metadata["modelspec.architecture"] == base.family.modelspec_architecture
    assert metadata["modelspec.prediction_type"] == ("v" if family == "sd2v" else "epsilon")
    tensors, _ = read_safetensors(path)
    te = base.text_encoder.state_dict()
    layer = (
        "text_model.encoder.layers.5.self_attn."
        if "text_model.encoder.layers.5.self_attn.q_proj.weight" in te
        else ("encoder.layers.5.self_attn.")
    )
    fused = torch.cat([te[f"{layer}{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(tensors[f"{TE}transformer.resblocks.5.attn.in_proj_weight"], fused)
    assert torch.equal(
        tensors[f"{TE}transformer.resblocks.5.attn.in_proj_bias"],
        torch.cat([te[f"{layer}{p}_proj.bias"] for p in "qkv"]),
    )
    # the key set of the original SD2 files: 24 resblocks (diffusers keeps 23), text_projection, logit_scale
    blocks = {int(k.split(".")[4]) for k in header if k.startswith(f"{TE}transformer.resblocks.")}
    assert blocks == set(range(24))
    expected_te = {
        f"{TE}{k}"
        for k in (
            "token_embedding.weight",
            "positional_embedding",
            "ln_final.weight",
            "ln_final.bias",
            "text_projection",
            "logit_scale",
        )
    } | {
        f"{TE}transformer.resblocks.{i}.{part}"
        for i in range(24)
        for part in (
            "attn.in_proj_weight",
            "attn.in_proj_bias",
            "attn.out_proj.weight",
            "attn.out_proj.bias",
            "ln_1.weight",
            "ln_1.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        )
    }
    assert {k for k in header if k.startswith(TE)} == expected_te
    assert all(not tensors[k].any() for k in expected_te if ".resblocks.23." in k), (
        "the unused layer is an identity"
    )
    assert torch.equal(tensors[f"{TE}text_projection"], torch.eye(32))
    assert tensors[f"{TE}logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in header)

    assert check_base_spec(str(path)) is base.family  # the metadata tells sd2 from sd2v
    loaded = load_base(str(path))
    assert loaded.family is base.family and loaded.prediction_type == base.prediction_type
    same_components(base, loaded)
    again = save_single_file(tmp_path / "again.safetensors", loaded.family, loaded.components, dtype=None)
    second, _ = read_safetensors(again)
    assert set(second) == set(tensors) and all(torch.equal(second[k], t) for k, t in tensors.items())


def test_diffusers_from_single_file_reads_our_sd2_file(tmp_path):
    """diffusers' own single-file loader (its converters, component configs from a local folder, no hub)
    builds the same model from our file."""
    from diffusers import StableDiffusionPipeline

    base = small_base("sd2")
    folder = export_base(base, tmp_path / "config")  # only its configs are used
    path = save_single_file(tmp_path / "m.safetensors", base.family, base.components, dtype=None)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(pipe, name).state_dict()
        mine = base.components[name].state_dict()
        assert set(theirs) == set(mine), name
        assert all(torch.equal(theirs[k], t) for k, t in mine.items()), name


def test_merge_and_dreambooth_write_sd2_single_files(circles, tmp_path):
    """``tuner merge --format single-file`` and DreamBooth's ``output.model_format = "single-file"`` on an SD2
    base write files that load back as exactly the merged / fine-tuned model. (The small SD2 base is used as
    a single file: its folder's tiny cross-attention width names no family.)"""
    from tuner.cli import main
    from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for
    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    small = small_base("sd2")
    base_file = save_single_file(tmp_path / "base.safetensors", small.family, small.components, dtype=None)
    common = {
        "train__batch_size": 1,
        "data__resolution": 64,
        "model__base": str(base_file),
        "adapter__rank": 4,
        "output__save_dtype": "fp32",
    }
    recipe = small_recipe(circles, tmp_path / "lora", train__steps=1, optim__learning_rate=2e-2, **common)
    lora = train(setup_run(recipe, log=quiet), log=quiet).outputs[0]
    merged_file = tmp_path / "merged.safetensors"
    args = [
        "merge",
        "--base",
        str(base_file),
        "--lora",
        str(lora),
        "--out",
        str(merged_file),
        "--format",
        "single-file",
        "--save-dtype",
        "fp32",
    ]
    assert main(args) == 0
    expected = load_base(str(base_file))
    apply_loras(expected, load_loras_for(expected, [LoraSpec(lora)]))
    merged = load_base(str(merged_file))
    assert merged.family.name == "sd2"
    same_components(expected, merged)
    plain = small.unet.state_dict()
    assert any(not torch.equal(t, plain[k]) for k, t in merged.unet.state_dict().items()), (
        "nothing was merged"
    )

    recipe = small_recipe(
        circles,
        tmp_path / "db",
        train__steps=1,
        adapter__method="dreambooth",
        optim__learning_rate=1e-3,
        output__model_format="single-file",
        **common,
    )
    run = setup_run(recipe, log=quiet)
    outputs = train(run, log=quiet).outputs
    assert outputs[0].name == "model.safetensors"
    tuned = load_base(str(outputs[0]))
    assert tuned.family.name == "sd2"
    same_components(run.base, tuned)
    assert any(not torch.equal(t, plain[k]) for k, t in tuned.unet.state_dict().items()), (
        "DreamBooth changed nothing"
    )
