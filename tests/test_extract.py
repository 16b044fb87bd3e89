"""``tuner extract``: SVD factors of weight deltas, dynamic rank choice, extraction from two models, the
saved kohya file and the command.

The "tuned" model is the embedded tiny base plus known rank-2 deltas (singular values chosen here) on a
few Linear modules, a 1x1 conv, a 3x3 conv and a text-encoder projection, and one changed bias, which no
LoRA can carry.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tuner.adapters.extract import extract_lora, format_report, save_extracted
from tuner.adapters.lora import candidate_keys, merge_lora, unet_targets
from tuner.adapters.svd import choose_rank, low_rank, quantile
from tuner.cli import main
from tuner.errors import TunerError
from tuner.formats.kohya import kohya_name_table
from tuner.formats.lorafile import load_lora
from tuner.formats.metadata import read_tuner_block
from tuner.models.base import export_base, load_base
from tuner.models.families import SD15

Q = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "unet:mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
PROJ = "unet:down_blocks.0.attentions.0.proj_in"  # 1x1 conv
TEMB = "unet:mid_block.resnets.0.time_emb_proj"
CONV = "unet:mid_block.resnets.0.conv1"  # 3x3 conv
TE = "text_encoder:text_model.encoder.layers.0.self_attn.q_proj"
SINGULAR = {Q: (0.3, 0.1), FF: (0.5, 0.2), PROJ: (0.2, 0.2), TEMB: (0.2, 0.1), CONV: (0.4, 0.2), TE: (2.0, 1.0)}
CHANGED_BIAS = "unet:conv_in.bias"


def rank2(shape: tuple[int, ...], singular: tuple[float, float], seed: int) -> torch.Tensor:
    """A delta of ``shape`` whose flattened matrix has exactly the two given singular values."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    u, _ = torch.linalg.qr(torch.randn(rows, 2, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, 2, generator=g))
    return (u * torch.tensor(singular) @ v.T).reshape(shape)


def module(base, key: str) -> nn.Module:
    component, path = key.split(":", 1)
    model = getattr(base, component)
    if component == "text_encoder" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


@pytest.fixture(scope="module")
def tuned():
    model = load_base("tiny")
    with torch.no_grad():
        for i, (key, singular) in enumerate(SINGULAR.items()):
            weight = module(model, key).weight
            weight.add_(rank2(tuple(weight.shape), singular, seed=i))
        model.unet.conv_in.bias.add_(0.5)
    model.source = "tuned-tiny"
    return model


# ---- low_rank ------------------------------------------------------------------------------------------


def test_low_rank_recovers_a_linear_delta_and_clamps_the_rank():
    delta = rank2((40, 30), (3.0, 1.0), seed=0)
    up, down, retained = low_rank(delta, 4, clamp_quantile=None)
    assert up.shape == (40, 4) and down.shape == (4, 30)
    assert retained == pytest.approx(1.0, abs=1e-6)
    assert torch.linalg.norm(up @ down - delta) / torch.linalg.norm(delta) < 1e-5
    up, down, _ = low_rank(delta, 1000, clamp_quantile=None)  # min(rank, out, in)
    assert up.shape == (40, 30) and down.shape == (30, 30)


def test_low_rank_truncation_reports_the_energy_kept():
    delta = rank2((40, 30), (3.0, 1.0), seed=1)
    up, down, retained = low_rank(delta, 1, clamp_quantile=None)
    assert retained == pytest.approx(9 / 10, abs=1e-6)
    error = torch.linalg.norm(up @ down - delta) / torch.linalg.norm(delta)
    assert float(error) == pytest.approx(math.sqrt(1 / 10), abs=1e-5)


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (8, 6, 1, 1)])
def test_low_rank_conv_layout(shape):
    delta = rank2(shape, (1.0, 0.5), seed=2)
    up, down, retained = low_rank(delta, 3, clamp_quantile=None)
    assert down.shape == (3, *shape[1:]) and up.shape == (shape[0], 3, 1, 1)
    approx = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    assert torch.allclose(approx, delta, atol=1e-6) and retained == pytest.approx(1.0)


def test_low_rank_zero_delta_and_bad_input():
    up, down, retained = low_rank(torch.zeros(5, 4), 2)
    assert retained == 1.0 and not (up @ down).any()
    with pytest.raises(ValueError, match="rank must be at least 1"):
        low_rank(torch.ones(3, 3), 0)
    with pytest.raises(ValueError, match="shape"):
        low_rank(torch.ones(3), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        low_rank(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="clamp_quantile"):
        low_rank(torch.ones(3, 3), 1, clamp_quantile=1.5)


def test_default_clamp_bounds_both_factors_at_the_quantile():
    delta = rank2((64, 48), (1.0, 0.5), seed=3)
    delta[0, 0] += 50.0  # an outlier the clamp trims
    exact_up, exact_down, _ = low_rank(delta, 2, clamp_quantile=None)
    bound = float(torch.quantile(torch.cat([exact_up.flatten(), exact_down.flatten()]).abs(), 0.99))
    up, down, _ = low_rank(delta, 2)  # kohya's default 0.99
    assert float(torch.cat([up.flatten(), down.flatten()]).abs().max()) == pytest.approx(bound, rel=1e-6)
    assert float(exact_up.abs().max()) > bound * 2  # the clamp did something


@pytest.mark.parametrize("q", [0.0, 0.3, 0.99, 1.0])
def test_quantile_matches_torch(q):
    values = torch.randn(1001, generator=torch.Generator().manual_seed(4))
    assert quantile(values, q) == pytest.approx(float(torch.quantile(values, q)), abs=1e-6)


# ---- choose_rank ---------------------------------------------------------------------------------------

SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0])  # S^2 = 64, 16, 4, 1 (sum 85); S sums to 15


@pytest.mark.parametrize(
    ("mode", "param", "expected"),
    [
        ("sv_ratio", 1.0, 1),  # keep S > 8: none -> clamped to 1
        ("sv_ratio", 3.0, 2),  # keep S > 8/3
        ("sv_ratio", 4.0, 2),  # keep S > 2 (strictly)
        ("sv_ratio", 10.0, 4),
        ("sv_cumulative", 0.5, 1),  # cumulative 8/15 = 0.533
        ("sv_cumulative", 0.8, 2),  # 12/15 = 0.8 exactly reaches it
        ("sv_cumulative", 0.81, 3),
        ("sv_cumulative", 1.0, 4),
        ("sv_fro", 0.85, 1),  # 0.85^2 = 0.7225 <= 64/85 = 0.753
        ("sv_fro", 0.9, 2),  # 0.81 <= 80/85 = 0.941
        ("sv_fro", 0.99, 3),  # 0.9801 <= 84/85 = 0.988
        ("sv_fro", 1.0, 4),
    ],
)
def test_choose_rank_on_a_known_spectrum(mode, param, expected):
    assert choose_rank(SPECTRUM, mode, param) == expected


def test_choose_rank_clamps_and_validates():
    assert choose_rank(SPECTRUM, "sv_ratio", 10.0, max_rank=2) == 2
    assert choose_rank(torch.zeros(5), "sv_fro", 0.9) == 1
    for mode, param in [("sv_ratio", 0.5), ("sv_fro", 0.0), ("sv_cumulative", 1.5)]:
        with pytest.raises(ValueError, match=mode):
            choose_rank(SPECTRUM, mode, param)
    with pytest.raises(ValueError, match="unknown dynamic rank mode"):
        choose_rank(SPECTRUM, "sv_magic", 0.5)


# ---- extract_lora --------------------------------------------------------------------------------------


def test_extract_recovers_known_deltas(base, tuned):
    result = extract_lora(base, tuned, rank=4, conv_rank=4, clamp_quantile=None)
    assert set(result.weights.modules) == set(SINGULAR)
    for report in result.reports:
        assert report.retained == pytest.approx(1.0, abs=1e-6), report
        assert report.rel_error < 1e-4, report
        assert report.rank == 4
    for key, mod in result.weights.modules.items():
        assert mod.alpha == mod.rank == 4, key  # scale 1, kohya's rule
    conv = result.weights.modules[CONV]
    assert conv.down.shape == (4, 128, 3, 3) and conv.up.shape == (128, 4, 1, 1)
    assert result.weights.modules[PROJ].down.ndim == 4
    assert result.left_out == [CHANGED_BIAS] and result.convs_left_out == []
    assert result.text_encoders == {"text_encoder": "extracted"}
    assert len(result.zero) > 50 and not set(result.zero) & set(SINGULAR)
    summary = result.summary
    assert summary.modules == len(SINGULAR) and summary.min_retained == pytest.approx(1.0, abs=1e-6)
    assert len(summary.worst) == 5


def test_merged_extraction_reproduces_the_tuned_weights(base, tuned):
    result = extract_lora(base, tuned, rank=2, conv_rank=2, clamp_quantile=None)
    models = {"unet": copy.deepcopy(base.unet), "text_encoder": copy.deepcopy(base.text_encoder)}
    assert merge_lora(models, result.weights) == len(SINGULAR)
    for component, merged in models.items():
        target = dict(getattr(tuned, component).named_parameters())
        for name, p in merged.named_parameters():
            if f"{component}:{name}" == CHANGED_BIAS:
                continue
            assert torch.allclose(p, target[name], atol=1e-5), f"{component}:{name}"


def test_rank_below_the_true_rank_reports_what_is_lost(base, tuned):
    result = extract_lora(base, tuned, rank=1, conv_rank=1, clamp_quantile=None)
    reports = {r.key: r for r in result.reports}
    for key, (s1, s2) in SINGULAR.items():
        kept = s1**2 / (s1**2 + s2**2)
        assert reports[key].retained == pytest.approx(kept, abs=1e-5), key
        assert reports[key].rel_error == pytest.approx(math.sqrt(1 - kept), abs=1e-4), key
    worst = result.worst()
    assert worst[0].key == PROJ and worst[0].retained == pytest.approx(0.5, abs=1e-5)  # equal singular values
    text = format_report(result, rows=3)
    assert text.splitlines()[2].startswith(PROJ) and f"... {len(SINGULAR) - 3} more" in text
    assert "retained energy mean" in text and "not in the LoRA: 1 changed tensor" in text


def test_rank_is_clamped_to_the_module_size(base, tuned):
    result = extract_lora(base, tuned, rank=10_000, conv_rank=10_000, text_encoder=False)
    for report in result.reports:
        assert report.rank == min(report.shape[0], math.prod(report.shape[1:])), report


def test_3x3_convs_need_conv_rank_and_text_encoder_options(base, tuned):
    result = extract_lora(base, tuned, rank=2)
    assert CONV not in result.weights.modules and result.convs_left_out == [CONV]
    assert f"{CONV}.weight" in result.left_out
    assert "pass --conv-rank" in format_report(result)

    no_te = extract_lora(base, tuned, rank=2, text_encoder=False)
    assert not no_te.weights.components() & {"text_encoder"}
    assert no_te.text_encoders == {"text_encoder": "not requested"} and f"{TE}.weight" in no_te.left_out

    dropped = extract_lora(base, tuned, rank=2, min_diff=100.0)
    assert TE not in dropped.weights.modules and dropped.text_encoders["text_encoder"].startswith("dropped")


def test_identical_models_give_an_empty_result_that_is_never_saved(base, tmp_path):
    result = extract_lora(base, base, rank=2, conv_rank=2)
    assert result.is_empty and not result.reports and not result.left_out
    assert result.zero == [f"unet:{p}" for p in unet_targets(base.unet, "locon")]  # the text encoder: dropped
    assert result.summary.mean_retained is None
    assert "nothing to extract" in format_report(result)
    out = tmp_path / "same.safetensors"
    with pytest.raises(TunerError, match="identical weights.*no file written"):
        save_extracted(out, result)
    assert not out.exists()


def test_mismatched_models_are_refused_naming_the_first_difference(base, tuned):
    with pytest.raises(TunerError, match="sd15"):
        extract_lora(base, dataclasses.replace(tuned, family=SD15), rank=2)
    unet = copy.deepcopy(tuned.unet)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k = nn.Linear(64, 32, bias=False)
    with pytest.raises(TunerError) as info:
        extract_lora(base, dataclasses.replace(tuned, unet=unet), rank=2)
    assert "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight" in str(info.value)
    assert "[64, 64]" in str(info.value) and "[32, 64]" in str(info.value)


def test_saved_file_round_trips_with_metadata(base, tuned, tmp_path):
    result = extract_lora(base, tuned, rank=2, conv_rank=2, clamp_quantile=None)
    path = tmp_path / "sub" / "x.safetensors"
    save_extracted(path, result, dtype=torch.float32)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    loaded = load_lora(path, name_table=kohya_name_table(base.family, candidate_keys(models)))
    assert set(loaded.modules) == set(result.weights.modules)
    for key, mod in result.weights.modules.items():
        assert torch.equal(loaded.modules[key].down, mod.down) and loaded.modules[key].alpha == 2.0
    meta = loaded.metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    assert meta["ss_training_comment"] == "extracted from tuned-tiny minus tiny at rank 2, conv rank 2"
    block = read_tuner_block(meta)
    assert block is not None and block["method"] == "extract" and block["tuned"] == "tuned-tiny"


# ---- the command ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    rc: int
    out: str
    err: str


def tuner(*argv: object) -> Run:
    """``tuner ARGV...`` in-process, with what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return Run(rc, out.getvalue(), err.getvalue())


KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def test_cli_extract_writes_a_kohya_file_that_sample_loads(tuned, tmp_path):
    folder = export_base(tuned, tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    r = tuner("extract", "--base", "tiny", "--tuned", folder, "--rank", 4, "--conv-rank", 2, "--out", out)
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert lines[1].split() == ["module", "rank", "retained", "rel.", "error"]
    assert lines[2].startswith(CONV) or lines[2].startswith(PROJ)  # the worst modules come first
    assert "summary: 6 modules extracted" in r.out and f"wrote {out}" in r.out
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("lora_unet_mid_block_resnets_0_conv1.alpha").item() == 2.0
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").ndim == 0
        assert f.get_tensor("lora_unet_mid_block_resnets_0_conv1.lora_down.weight").dtype == torch.float16
    assert all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)]
    assert len(keys) == 3 * len(SINGULAR)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys

    r = tuner("sample", "--base", "tiny", "--lora", out, "--prompt", "a red circle", "--steps", 1,
              "--out", tmp_path / "samples")
    assert r.rc == 0, r.err
    assert list((tmp_path / "samples").glob("*.png"))


def test_cli_extract_identical_models_writes_nothing(tmp_path):
    out = tmp_path / "same.safetensors"
    r = tuner("extract", "--base", "tiny", "--tuned", "tiny", "--rank", 2, "--out", out)
    assert r.rc == 2 and "identical weights" in r.err and not out.exists()


def test_cli_extract_checks_paths_before_loading(tmp_path, monkeypatch):
    def no_load(spec, **kw):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr("tuner.models.base.load_base", no_load)
    out = tmp_path / "x.safetensors"
    r = tuner("extract", "--base", "tiny", "--tuned", tmp_path / "nope", "--rank", 2, "--out", out)
    assert r.rc == 2 and "--tuned" in r.err and "nope" in r.err
    r = tuner("extract", "--base", "tiny", "--tuned", "tiny", "--rank", 2, "--out", tmp_path / "x.pt")
    assert r.rc == 2 and ".safetensors" in r.err


def test_cli_save_dtype_choices_are_the_library_ones():
    from tuner.adapters.extract import SAVE_DTYPES
    from tuner.cli import build_parser

    extract = build_parser()._subparsers._group_actions[0].choices["extract"]
    assert tuple(next(a.choices for a in extract._actions if a.dest == "save_dtype")) == tuple(SAVE_DTYPES)
