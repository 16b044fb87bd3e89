"""`tuner resize`: SVD rank reduction that keeps the effective scale (FORMATS.md §7)."""

from __future__ import annotations

import re

import pytest
import torch

from tuner.adapters.resize import resize_file, resize_tensors
from tuner.cli import main
from tuner.errors import TunerError
from tuner.formats.inspect import inspect_file
from tuner.formats.io import read_safetensors, save_safetensors

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def factors(out, inp, r, seed, kernel=None):
    g = torch.Generator().manual_seed(seed)
    if kernel:
        return torch.randn(out, r, 1, 1, generator=g), torch.randn(r, inp, kernel, kernel, generator=g)
    return torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)


def delta(t, name):
    up, down = t[name + ".lora_up.weight"].float(), t[name + ".lora_down.weight"].float()
    r = down.shape[0]
    return float(t[name + ".alpha"]) / r * (up.flatten(1) @ down.flatten(1))


@pytest.fixture
def lora_file(tmp_path):
    up, down = factors(32, 24, 8, 0)
    cup, cdown = factors(16, 8, 4, 1, kernel=3)
    tensors = {
        f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down, f"{LIN}.alpha": torch.tensor(4.0),
        f"{CONV}.lora_up.weight": cup, f"{CONV}.lora_down.weight": cdown, f"{CONV}.alpha": torch.tensor(4.0),
        "bundle_emb.<zz>.string_to_param.*": torch.ones(2, 8),
    }
    path = tmp_path / "in.safetensors"
    save_safetensors(path, tensors, {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_training_comment": "orig"})
    return path


def test_resize_to_the_full_rank_is_lossless(lora_file, tmp_path):
    tensors, _ = read_safetensors(lora_file)
    result = resize_file(lora_file, tmp_path / "full.safetensors", rank=8)
    for name in (LIN, CONV):
        torch.testing.assert_close(delta(result.tensors, name), delta(tensors, name), rtol=1e-4, atol=1e-4)
    assert all(m.retained == pytest.approx(1.0) for m in result.modules)
    assert {m.new_rank for m in result.modules} == {8, 4}


def test_lower_rank_keeps_the_scale_and_is_the_best_approximation(lora_file, tmp_path):
    tensors, _ = read_safetensors(lora_file)
    result = resize_file(lora_file, tmp_path / "r2.safetensors", rank=2)
    new, meta = read_safetensors(tmp_path / "r2.safetensors")
    assert float(new[f"{LIN}.alpha"]) == pytest.approx(4.0 / 8 * 2) and float(new[f"{CONV}.alpha"]) == pytest.approx(4.0 / 4 * 2)
    for name in (LIN, CONV):
        original = delta(tensors, name)
        u, s, vh = torch.linalg.svd(original)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(delta(new, name), best, rtol=1e-3, atol=1e-3)
        report = next(m for m in result.modules if m.name == name)
        assert report.retained == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-4)
        assert report.retained < 0.99
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "Dynamic"  # 1.0 and 2.0
    assert meta["ss_training_comment"].startswith("resized by tuner to rank 2; orig")
    assert torch.equal(new["bundle_emb.<zz>.string_to_param.*"], torch.ones(2, 8))
    assert inspect_file(tmp_path / "r2.safetensors")["hashes"]["matches"] is True


def test_dynamic_rank_and_errors(lora_file, tmp_path):
    tensors, _ = read_safetensors(lora_file)
    _, reports = resize_tensors(tensors, dynamic="sv_fro", param=1.0)
    assert {m.name: m.new_rank for m in reports} == {LIN: 8, CONV: 4}
    _, reports = resize_tensors(tensors, dynamic="sv_ratio", param=1.0)
    assert all(m.new_rank == 1 for m in reports)
    with pytest.raises(TunerError, match="either a fixed --rank or --dynamic"):
        resize_tensors(tensors)
    with pytest.raises(TunerError, match="sv_fro takes a fraction"):
        resize_tensors(tensors, dynamic="sv_fro", param=2.0)


def test_cli_resize_prints_the_worst_modules(lora_file, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["resize", str(lora_file), "--rank", "1", "--conv-rank", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^{LIN}\s+8->1\s", text, re.M) and re.search(rf"^{CONV}\s+4->2\s", text, re.M)
    assert "summary: 2 modules" in text
    new, _ = read_safetensors(out)
    assert new[f"{LIN}.lora_down.weight"].shape == (1, 24) and new[f"{CONV}.lora_down.weight"].shape == (2, 8, 3, 3)
    assert main(["resize", str(tmp_path / "missing.safetensors"), "--rank", "1", "--out", str(out)]) == 2


def test_lower_ranks_change_the_images_as_much_as_the_reported_error_says(trained_run, tmp_path):
    """A trained LoRA resized to its own rank draws the same image; lower ranks report more lost energy and
    draw images further from the original, in that order."""
    from tuner.models.base import load_base
    from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for
    from tuner.sample.sampler import SampleSettings, sample_images

    source = trained_run[1].outputs[0]
    rank = int(read_safetensors(source)[1]["ss_network_dim"])

    def image(lora):
        base = load_base("tiny")
        if lora is not None:
            apply_loras(base, load_loras_for(base, [LoraSpec(lora)]), merge=True)
        img = sample_images(base, ["a large red circle on a blue background"], [0], SampleSettings(steps=8))[0]
        return torch.tensor(list(img.getdata()), dtype=torch.float32)

    original = image(source)
    lost, moved = [], []
    for r in (rank, 2, 1):
        result = resize_file(source, tmp_path / f"r{r}.safetensors", rank=r, dtype=torch.float32)
        lost.append(1 - min(m.retained for m in result.modules))
        moved.append(float((image(tmp_path / f"r{r}.safetensors") - original).abs().mean()))
    assert lost[0] < 1e-5 and moved[0] <= 0.5  # full rank: lossless, the same picture (mean < 0.5/255)
    assert lost[0] < lost[1] < lost[2]
    assert moved[0] < moved[1] <= moved[2] and moved[2] > 1.0  # visibly different, more so at rank 1
    assert float((image(None) - original).abs().mean()) > moved[2]  # still closer than no LoRA at all
