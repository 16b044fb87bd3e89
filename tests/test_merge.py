"""tuner merge: LoRAs into the tiny base (merged folder == base + unmerged LoRAs), and LoRA + LoRA into one
LoRA by rank concatenation (exact) or SVD to a rank (error reported per module)."""

from __future__ import annotations

import copy

import pytest
import torch

from tuner.adapters.lora import attach_lora_file
from tuner.adapters.merge import MergeInput, concat_loras, format_merge_report, merge_into_base, merge_loras
from tuner.adapters.types import LoraModule, LoraWeights
from tuner.cli import main
from tuner.errors import TunerError
from tuner.formats.convert import read_lora_file
from tuner.formats.lorafile import save_lora
from tuner.formats.metadata import build_lora_metadata, read_tuner_block
from tuner.models.base import load_base
from tuner.models.families import TINY

SHAPES = {
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": (128, 128),
    "unet:down_blocks.0.resnets.0.conv1": (64, 64, 3, 3),
    "text_encoder:text_model.encoder.layers.0.self_attn.q_proj": (128, 128),
}


def lora_file(path, seed, keys, rank=4, alpha=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in keys:
        shape = SHAPES[key]
        down = torch.randn(rank, shape[1], *shape[2:], generator=g) * 0.2
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.2
        modules[key] = LoraModule(down, up, alpha + seed)
    weights = LoraWeights(modules)
    save_lora(path, weights, TINY, dtype=dtype,
              metadata=build_lora_metadata(family=TINY, rank=rank, alpha=alpha + seed, output_name=path.stem))
    return weights


@pytest.fixture()
def two_loras(tmp_path):
    a = lora_file(tmp_path / "a.safetensors", 1, list(SHAPES))
    b = lora_file(tmp_path / "b.safetensors", 2, list(SHAPES)[1:], rank=3)
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", a, b


def summed(a, b, ra, rb):
    out = {}
    for key, shape in SHAPES.items():
        total = torch.zeros(shape)
        for weights, ratio in ((a, ra), (b, rb)):
            if key in weights.modules:
                total += weights.modules[key].delta(shape, ratio)
        out[key] = total
    return out


def test_concatenation_is_exact(two_loras, tmp_path):
    pa, pb, a, b = two_loras
    result = merge_loras([MergeInput(pa, 0.7), MergeInput(pb, -0.4)], tmp_path / "m.safetensors")
    assert result.mode == "concat" and result.modules == 4 and not result.reports
    merged, _, _ = read_lora_file(tmp_path / "m.safetensors")
    expected = summed(a, b, 0.7, -0.4)
    for key, delta in expected.items():
        module = merged.modules[key]
        assert module.rank == (4 if key == next(iter(SHAPES)) else 7)
        torch.testing.assert_close(module.delta(SHAPES[key]), delta, atol=1e-7, rtol=1e-6)
    meta = merged.metadata
    assert meta["ss_network_dim"] == "Dynamic" and meta["modelspec.merged_from"] == "a, b"
    assert [s["ratio"] for s in read_tuner_block(meta)["merge"]["sources"]] == [0.7, -0.4]
    # same scale and ratio: factors are only stacked, never rescaled
    same = concat_loras([(a, 1.0), (a, 1.0)])
    key = next(iter(SHAPES))
    assert torch.equal(same.modules[key].up[:, :4], a.modules[key].up.float())


def test_svd_merge_reports_errors(two_loras, tmp_path):
    pa, pb, a, b = two_loras
    expected = summed(a, b, 1.0, 0.5)
    full = merge_loras([MergeInput(pa), MergeInput(pb, 0.5)], tmp_path / "full.safetensors", rank=7)
    assert max(m.rel_error for m in full.reports) < 1e-3  # rank 7 holds the whole sum: lossless
    low = merge_loras([MergeInput(pa), MergeInput(pb, 0.5)], tmp_path / "low.safetensors", rank=2)
    merged, _, _ = read_lora_file(tmp_path / "low.safetensors")
    for report in low.reports:
        key = next(k for k in SHAPES if k.split(":", 1)[1].replace(".", "_") in report.name)
        approx = merged.modules[key].delta(SHAPES[key])
        actual = float((approx - expected[key]).norm() / expected[key].norm())
        assert report.new_rank == 2 and abs(actual - report.rel_error) < 1e-3
        assert report.rel_error > 0.05
    text = format_merge_report(low)
    assert "rel. error" in text and "summary: 4 modules" in text


def test_merged_base_equals_unmerged_loras(two_loras, tmp_path):
    pa, pb, a, b = two_loras
    folder, modules = merge_into_base("tiny", [MergeInput(pa, 0.8), MergeInput(pb, 0.5)], tmp_path / "merged")
    assert modules == 7 and (folder / "unet").is_dir()
    merged = load_base(str(folder))
    live = load_base("tiny")
    models = {"unet": live.unet, "text_encoder": live.text_encoder}
    loaded_a, _, _ = read_lora_file(pa)
    loaded_b, _, _ = read_lora_file(pb)
    plain = copy.deepcopy(live.unet)
    attach_lora_file(models, loaded_a, "a", 0.8)
    attach_lora_file(models, loaded_b, "b", 0.5)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, 128, generator=g)
    ids = torch.tensor([[0, 5, 9, 12, 1]])
    with torch.no_grad():
        out_merged = merged.unet(latents, 10, encoder_hidden_states=text).sample
        out_live = live.unet(latents, 10, encoder_hidden_states=text).sample
        out_plain = plain(latents, 10, encoder_hidden_states=text).sample
        te_merged = merged.text_encoder(ids).last_hidden_state
        te_live = live.text_encoder(ids).last_hidden_state
    assert not torch.allclose(out_merged, out_plain, atol=1e-3)
    torch.testing.assert_close(out_merged, out_live, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(te_merged, te_live, atol=1e-4, rtol=1e-4)


def test_merge_errors_and_cli(two_loras, tmp_path, capsys):
    pa, pb, _, _ = two_loras
    with pytest.raises(TunerError, match="at least two"):
        merge_loras([MergeInput(pa)], tmp_path / "x.safetensors")
    with pytest.raises(TunerError, match="does not exist"):
        merge_loras([MergeInput(pa), MergeInput(tmp_path / "nope.safetensors")], tmp_path / "x.safetensors")
    assert MergeInput.parse("a.safetensors:0.5").ratio == 0.5 and MergeInput.parse("a.safetensors").ratio == 1.0
    assert main(["merge", "--lora", f"{pa}:1", "--lora", f"{pb}:0.5", "--rank", "3", "--out",
                 str(tmp_path / "cli.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "rel. error" in out and "svd rank 3" in out
    assert main(["merge", "--base", "tiny", "--lora", str(pa), "--rank", "3", "--out", str(tmp_path / "d")]) == 2


def test_merge_into_a_single_file_checkpoint(tmp_path):
    """--format single-file: one LDM-layout file that loads back (as A1111/ComfyUI read it) to exactly the
    merged weights. The tiny base has no LDM layout, so a small SD1.5 topology."""
    from tuner.models.families import SD15
    from tuner.models.small import small_base

    merged = small_base("sd15")
    key = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = key.split(":", 1)[1]
    before = merged.unet.get_submodule(name).weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    modules = {key: LoraModule(torch.randn(4, before.shape[1], generator=g),
                               torch.randn(before.shape[0], 4, generator=g), 4.0)}
    lora = tmp_path / "l.safetensors"
    save_lora(lora, LoraWeights(modules), SD15, dtype=torch.float32,
              metadata=build_lora_metadata(family=SD15, rank=4, alpha=4.0, output_name="l"))
    path, count = merge_into_base("unused", [MergeInput(lora, 0.7)], tmp_path / "merged.safetensors",
                                  single_file=True, dtype=None, base=merged)
    assert count == 1
    from_file = load_base(str(path))
    assert from_file.family.name == "sd15"
    assert not torch.equal(from_file.unet.get_submodule(name).weight, before)  # the LoRA is in it
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(merged, component).state_dict(), getattr(from_file, component).state_dict()
        for n, tensor in theirs.items():
            assert torch.equal(tensor, ours[n]), f"{component}.{n}"
    with pytest.raises(TunerError, match="writes one .safetensors file"):
        merge_into_base("tiny", [MergeInput(lora, 1.0)], tmp_path / "folder", single_file=True)
    assert main(["merge", "--lora", str(lora), "--format", "single-file", "--out", str(tmp_path / "x.safetensors")]) == 2
