"""LyCORIS LoHa/LoKr, DoRA, per-module alphas and dtypes: files built here from the published key layouts
load, and merging them adds exactly the deltas those layouts define (formulas re-derived in the tests)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tuner.adapters.lora import attach_lora_file, merge_lora
from tuner.errors import FormatError
from tuner.formats.inspect import format_inspection, inspect_file
from tuner.formats.io import save_safetensors
from tuner.formats.kohya import kohya_module_name
from tuner.models.base import load_base
from tuner.models.families import TINY
from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for

LINEAR = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV3 = "unet:down_blocks.0.resnets.0.conv1"
TE = "text_encoder:text_model.encoder.layers.0.self_attn.q_proj"
META = {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"}


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def weight(base, key):
    component, path = key.split(":", 1)
    model = base.unet if component == "unet" else base.text_encoder
    if component == "text_encoder" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path).weight.detach().clone()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def name(key):
    return kohya_module_name(TINY, key)


def merged_weights(base, path, scale=1.0, lenient=False):
    """Weights of LINEAR/CONV3/TE after merging the file into a copy of the base, as the sampler does."""
    copy_ = copy.copy(base)
    copy_.unet, copy_.text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    apply_loras(copy_, load_loras_for(copy_, [LoraSpec(path, scale)], lenient=lenient))
    return {key: weight(copy_, key) for key in (LINEAR, CONV3, TE)}


def tucker(t, wa, wb):
    """m[p, r, k, l] = sum_ij wa[i, p] t[i, j, k, l] wb[j, r], as batched matmuls over the kernel."""
    return (wa.T @ t.permute(2, 3, 0, 1) @ wb).permute(2, 3, 0, 1)


def kron(w1, w2):
    if w2.ndim == 4:
        a, b = w1.shape
        c, d, k, l_ = w2.shape
        return torch.einsum("ab,cdkl->acbdkl", w1, w2).reshape(a * c, b * d, k, l_)
    return torch.einsum("ab,cd->acbd", w1, w2).reshape(w1.shape[0] * w2.shape[0], -1)


def test_loha_plain_and_tucker(base, tmp_path):
    r = 3
    sd = {
        # Linear to_q [64, 64]: plain LoHa, alpha 1.5
        f"{name(LINEAR)}.hada_w1_a": rand(64, r, seed=1), f"{name(LINEAR)}.hada_w1_b": rand(r, 64, seed=2),
        f"{name(LINEAR)}.hada_w2_a": rand(64, r, seed=3), f"{name(LINEAR)}.hada_w2_b": rand(r, 64, seed=4),
        f"{name(LINEAR)}.alpha": torch.tensor(1.5),
        # 3x3 conv1 [64, 64, 3, 3]: Tucker LoHa, no alpha (scale 1)
        f"{name(CONV3)}.hada_t1": rand(r, r, 3, 3, seed=5), f"{name(CONV3)}.hada_t2": rand(r, r, 3, 3, seed=6),
        f"{name(CONV3)}.hada_w1_a": rand(r, 64, seed=7), f"{name(CONV3)}.hada_w1_b": rand(r, 64, seed=8),
        f"{name(CONV3)}.hada_w2_a": rand(r, 64, seed=9), f"{name(CONV3)}.hada_w2_b": rand(r, 64, seed=10),
        # text encoder q_proj [128, 128], fp16 factors, alpha 6
        f"{name(TE)}.hada_w1_a": rand(128, r, seed=11).half(), f"{name(TE)}.hada_w1_b": rand(r, 128, seed=12).half(),
        f"{name(TE)}.hada_w2_a": rand(128, r, seed=13).half(), f"{name(TE)}.hada_w2_b": rand(r, 128, seed=14).half(),
        f"{name(TE)}.alpha": torch.tensor(6.0, dtype=torch.float16),
    }  # fmt: skip
    path = tmp_path / "loha.safetensors"
    save_safetensors(path, sd, META)
    after = merged_weights(base, path, scale=0.5)
    n = name(LINEAR)
    expected = 0.5 * 1.5 / r * (sd[f"{n}.hada_w1_a"] @ sd[f"{n}.hada_w1_b"]) * (sd[f"{n}.hada_w2_a"] @ sd[f"{n}.hada_w2_b"])
    torch.testing.assert_close(after[LINEAR] - weight(base, LINEAR), expected, atol=1e-6, rtol=1e-5)
    n = name(CONV3)
    m1 = tucker(sd[f"{n}.hada_t1"], sd[f"{n}.hada_w1_a"], sd[f"{n}.hada_w1_b"])
    m2 = tucker(sd[f"{n}.hada_t2"], sd[f"{n}.hada_w2_a"], sd[f"{n}.hada_w2_b"])
    torch.testing.assert_close(after[CONV3] - weight(base, CONV3), 0.5 * m1 * m2, atol=1e-6, rtol=1e-5)
    n = name(TE)
    f = {k: v.float() for k, v in sd.items()}
    expected = 0.5 * 6.0 / r * (f[f"{n}.hada_w1_a"] @ f[f"{n}.hada_w1_b"]) * (f[f"{n}.hada_w2_a"] @ f[f"{n}.hada_w2_b"])
    torch.testing.assert_close(after[TE] - weight(base, TE), expected, atol=1e-6, rtol=1e-5)

    info = inspect_file(path)
    assert info["format"] == "lycoris-loha" and info["method"] == "loha" and info["modules"] == 3
    assert info["rank"] == r and info["family"] == "tiny"
    assert info["loaders"]["diffusers"]["loads"] == "no" and info["loaders"]["ComfyUI"]["loads"] == "yes"
    text = format_inspection(info)
    assert "module kinds: loha (3)" in text and "diffusers: no" in text


def test_lokr_full_decomposed_and_tucker(base, tmp_path):
    sd = {
        # to_q [64, 64] = kron(w1 [8, 4], w2_a @ w2_b [8, 16]) with alpha 2, rank 2 -> scale 1
        f"{name(LINEAR)}.lokr_w1": rand(8, 4, seed=1),
        f"{name(LINEAR)}.lokr_w2_a": rand(8, 2, seed=2), f"{name(LINEAR)}.lokr_w2_b": rand(2, 16, seed=3),
        f"{name(LINEAR)}.alpha": torch.tensor(2.0),
        # conv1 [64, 64, 3, 3] = kron(w1_a @ w1_b [4, 4], Tucker w2 [16, 16, 3, 3]); alpha 1, rank (w2) 2
        f"{name(CONV3)}.lokr_w1_a": rand(4, 3, seed=4), f"{name(CONV3)}.lokr_w1_b": rand(3, 4, seed=5),
        f"{name(CONV3)}.lokr_t2": rand(2, 2, 3, 3, seed=6),
        f"{name(CONV3)}.lokr_w2_a": rand(2, 16, seed=7), f"{name(CONV3)}.lokr_w2_b": rand(2, 16, seed=8),
        f"{name(CONV3)}.alpha": torch.tensor(1.0),
        # q_proj [128, 128] = kron(w1 [16, 8], w2 [8, 16]): both full -> scale 1 whatever alpha says
        f"{name(TE)}.lokr_w1": rand(16, 8, seed=9).to(torch.bfloat16),
        f"{name(TE)}.lokr_w2": rand(8, 16, seed=10).to(torch.bfloat16),
        f"{name(TE)}.alpha": torch.tensor(123.0, dtype=torch.bfloat16),
    }  # fmt: skip
    path = tmp_path / "lokr.safetensors"
    save_safetensors(path, sd, META)
    after = merged_weights(base, path)
    n = name(LINEAR)
    expected = kron(sd[f"{n}.lokr_w1"], sd[f"{n}.lokr_w2_a"] @ sd[f"{n}.lokr_w2_b"])
    torch.testing.assert_close(after[LINEAR] - weight(base, LINEAR), expected, atol=1e-6, rtol=1e-5)
    n = name(CONV3)
    w2 = tucker(sd[f"{n}.lokr_t2"], sd[f"{n}.lokr_w2_a"], sd[f"{n}.lokr_w2_b"])
    expected = 0.5 * kron(sd[f"{n}.lokr_w1_a"] @ sd[f"{n}.lokr_w1_b"], w2)
    torch.testing.assert_close(after[CONV3] - weight(base, CONV3), expected, atol=1e-6, rtol=1e-5)
    n = name(TE)
    expected = kron(sd[f"{n}.lokr_w1"].float(), sd[f"{n}.lokr_w2"].float())
    torch.testing.assert_close(after[TE] - weight(base, TE), expected, atol=1e-6, rtol=1e-5)
    info = inspect_file(path)
    assert info["format"] == "lycoris-lokr" and info["method"] == "lokr" and info["modules"] == 3


def dora_expected(w, delta, m, per_output):
    combined = w + delta
    if per_output:
        norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
    else:
        norm = combined.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.ndim - 2))
    return m.reshape(norm.shape) * combined / norm


def test_dora_kohya_and_peft_layouts(base, tmp_path):
    r = 4
    down, up = rand(r, 64, seed=1), rand(64, r, seed=2)
    w = weight(base, LINEAR)
    delta = 2.0 / r * up @ down
    m_out = (w + delta).norm(dim=1, keepdim=True) * (1 + rand(64, 1, seed=3))  # [out, 1]: per output row
    w3 = weight(base, CONV3)
    d3, u3 = rand(r, 64, 3, 3, seed=4), rand(64, r, 1, 1, seed=5)
    delta3 = (u3.flatten(1) @ d3.flatten(1)).reshape(w3.shape)  # no alpha: scale 1
    m_in = torch.rand(1, 64, 1, 1, generator=torch.Generator().manual_seed(6)) + 0.5  # [1, in]: per input column
    sd = {
        f"{name(LINEAR)}.lora_down.weight": down, f"{name(LINEAR)}.lora_up.weight": up,
        f"{name(LINEAR)}.alpha": torch.tensor(2.0), f"{name(LINEAR)}.dora_scale": m_out,
        f"{name(CONV3)}.lora_down.weight": d3, f"{name(CONV3)}.lora_up.weight": u3,
        f"{name(CONV3)}.dora_scale": m_in,
    }  # fmt: skip
    path = tmp_path / "dora.safetensors"
    save_safetensors(path, sd, META)
    after = merged_weights(base, path)
    torch.testing.assert_close(after[LINEAR], dora_expected(w, delta, m_out, True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[CONV3], dora_expected(w3, delta3, m_in, False), atol=1e-5, rtol=1e-5)
    half = merged_weights(base, path, scale=0.5)  # a multiplier blends towards the DoRA weight
    torch.testing.assert_close(half[LINEAR], w + 0.5 * (dora_expected(w, delta, m_out, True) - w), atol=1e-5, rtol=1e-5)
    info = inspect_file(path)
    assert info["format"] == "dora" and info["method"] == "lora+dora" and info["kinds"] == {"dora+lora": 2}
    assert info["loaders"]["diffusers"]["loads"] == "no"

    # diffusers/PEFT naming: lora_A/lora_B (no alpha: scale 1) and lora_magnitude_vector [out]
    path = tmp_path / "dora_peft.safetensors"
    peft_key = "unet." + LINEAR.split(":", 1)[1]
    save_safetensors(path, {f"{peft_key}.lora_A.weight": down, f"{peft_key}.lora_B.weight": up,
                            f"{peft_key}.lora_magnitude_vector": m_out.flatten()}, {"format": "pt"})
    after = merged_weights(base, path)
    torch.testing.assert_close(after[LINEAR], dora_expected(w, up @ down, m_out, True), atol=1e-5, rtol=1e-5)
    assert inspect_file(path)["kinds"] == {"dora+lora": 1}


def test_per_module_alphas_and_dtypes(base, tmp_path):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        sd = {}
        expected = {}
        for i, key in enumerate((LINEAR, TE)):
            out_f, in_f = weight(base, key).shape
            down, up = rand(2 + i, in_f, seed=i).to(dtype), rand(out_f, 2 + i, seed=10 + i).to(dtype)
            alpha = torch.tensor(0.5 + 3 * i, dtype=dtype)
            sd |= {f"{name(key)}.lora_down.weight": down, f"{name(key)}.lora_up.weight": up, f"{name(key)}.alpha": alpha}
            expected[key] = float(alpha) / (2 + i) * up.float() @ down.float()
        path = tmp_path / f"alphas_{dtype}.safetensors"
        save_safetensors(path, sd, META)
        after = merged_weights(base, path)
        for key, delta in expected.items():
            torch.testing.assert_close(after[key] - weight(base, key), delta, atol=1e-6, rtol=1e-5)
        info = inspect_file(path)
        assert {(row["rank"], row["alpha"]) for row in info["rank_alpha"].values()} == {(2, 0.5), (3, 3.5)}
        assert info["loaders"]["diffusers"]["loads"] == "partial"  # alpha varies between Linear modules


def test_unknown_keys_are_listed_or_counted(base, tmp_path, caplog):
    sd = {f"{name(LINEAR)}.hada_w1_a": rand(64, 2), f"{name(LINEAR)}.hada_w1_b": rand(2, 64),
          f"{name(LINEAR)}.hada_w2_a": rand(64, 2), f"{name(LINEAR)}.hada_w2_b": rand(2, 64)}
    sd |= {f"lora_unet_nothing_{i}.hada_w1_a": rand(2, 2) for i in range(25)}
    sd[f"{name(TE)}.oft_blocks"] = rand(2, 2)
    path = tmp_path / "odd.safetensors"
    save_safetensors(path, sd, META)
    with pytest.raises(FormatError) as err:
        merged_weights(base, path)
    text = str(err.value)
    assert "26 problem(s)" in text and "... and 6 more" in text and "--lenient" in text and "oft_blocks" in text
    with caplog.at_level(logging.WARNING):
        after = merged_weights(base, path, lenient=True)
    assert "ignored 26 key(s)" in caplog.text
    assert not torch.equal(after[LINEAR], weight(base, LINEAR))


def test_other_family_is_refused_naming_both(base, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_safetensors(path, {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": rand(4, 1280),
                            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": rand(1280, 4)},
                     {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(FormatError, match=r"made for the sdxl family, but the loaded base is tiny"):
        load_loras_for(base, [LoraSpec(path)])


def test_lycoris_cannot_be_attached_unmerged(base, tmp_path):
    sd = {f"{name(LINEAR)}.lokr_w1": rand(8, 8), f"{name(LINEAR)}.lokr_w2": rand(8, 8)}
    path = tmp_path / "lokr.safetensors"
    save_safetensors(path, sd, META)
    (lora,) = load_loras_for(base, [LoraSpec(path)])
    models = {"unet": copy.deepcopy(base.unet)}
    with pytest.raises(FormatError, match="drop --no-merge"):
        attach_lora_file(models, lora.weights, "a")
    assert merge_lora(models, lora.weights) == 1
