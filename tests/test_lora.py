"""LoRA layers on live models: module sets, a fresh adapter is a no-op, merged equals unmerged."""

from __future__ import annotations

import pytest
import torch

from tuner.adapters.lora import (
    attach_lora,
    attach_lora_file,
    candidate_keys,
    extract_lora,
    merge_lora,
    plan_ranks,
    text_encoder_targets,
    unet_targets,
)
from tuner.adapters.types import LoraModule, LoraWeights
from tuner.models.base import load_base


def unet_out(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 32, 128, generator=g)
    with torch.no_grad():
        return base.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def te_out(base):
    ids = base.tokenizer(["a red circle on a blue background"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return base.text_encoder(ids)[0]


def test_presets_select_expected_modules():
    base = load_base("tiny")
    attn = unet_targets(base.unet, "attention")
    # tiny UNet: 2 down + 1 mid + 2x2 up transformer blocks... each block has attn1/attn2 x q,k,v,out
    assert attn and all(n.rsplit(".", 2)[-2] in ("attn1", "attn2") or n.endswith("to_out.0") for n in attn)
    assert len(attn) % 8 == 0
    ff = unet_targets(base.unet, "attention_ff_proj")
    kohya = unet_targets(base.unet, "kohya")
    locon = unet_targets(base.unet, "locon")
    assert set(attn) < set(ff) and set(ff) == set(kohya) and set(kohya) < set(locon)
    assert any(n.endswith("resnets.0.conv1") for n in locon) and not any("conv_in" in n for n in locon)
    assert len(text_encoder_targets(base.text_encoder)) == 4 * 6


def test_fresh_lora_changes_nothing():
    base = load_base("tiny")
    before_u, before_t = unet_out(base), te_out(base)
    attach_lora(base.unet, plan_ranks(base.unet, unet_targets(base.unet, "locon"), rank=4, alpha=2, conv_rank=2,
                                       conv_alpha=1))
    attach_lora(base.text_encoder, plan_ranks(base.text_encoder, text_encoder_targets(base.text_encoder),
                                               rank=4, alpha=4))
    assert torch.equal(unet_out(base), before_u)
    assert torch.equal(te_out(base), before_t)


def random_lora(base, preset="locon", seed=0) -> LoraWeights:
    """Random factors (non-zero up) with varying alphas for every module of a preset + the text encoder."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    targets = {"unet": unet_targets(base.unet, preset), "text_encoder": text_encoder_targets(base.text_encoder)}
    for component, names in targets.items():
        named = dict(models[component].named_modules())
        for i, name in enumerate(names):
            w = named[name].weight
            r = 2 + i % 3
            down_shape = (r, w.shape[1], *w.shape[2:])
            up_shape = (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())
            key = f"{component}:{'text_model.' + name if component == 'text_encoder' else name}"
            modules[key] = LoraModule(
                down=torch.randn(down_shape, generator=g) * 0.1,
                up=torch.randn(up_shape, generator=g) * 0.1,
                alpha=float(1 + i % 4),
            )
    return LoraWeights(modules=modules)


def test_merged_equals_unmerged():
    weights = random_lora(load_base("tiny"))
    merged = load_base("tiny")
    merge_lora({"unet": merged.unet, "text_encoder": merged.text_encoder}, weights, 0.7)
    live = load_base("tiny")
    attach_lora_file({"unet": live.unet, "text_encoder": live.text_encoder}, weights, "a", multiplier=0.7)
    plain = load_base("tiny")
    assert not torch.allclose(unet_out(merged), unet_out(plain), atol=1e-3)
    torch.testing.assert_close(unet_out(merged), unet_out(live), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(te_out(merged), te_out(live), atol=1e-4, rtol=1e-4)


def test_merge_is_the_documented_delta():
    base = load_base("tiny")
    weights = random_lora(base, "attention")
    key = next(iter(weights.modules))
    name = key.split(":", 1)[1]
    before = base.unet.get_submodule(name).weight.detach().clone()
    merge_lora({"unet": base.unet, "text_encoder": base.text_encoder}, weights, 0.5)
    mod = weights.modules[key]
    expected = before + 0.5 * (mod.alpha / mod.rank) * (mod.up @ mod.down)
    torch.testing.assert_close(base.unet.get_submodule(name).weight, expected)


def test_two_files_unmerged_add_up():
    a, b = random_lora(load_base("tiny"), "attention", 1), random_lora(load_base("tiny"), "attention", 2)
    merged = load_base("tiny")
    models = {"unet": merged.unet, "text_encoder": merged.text_encoder}
    merge_lora(models, a, 1.0)
    merge_lora(models, b, 0.5)
    live = load_base("tiny")
    models = {"unet": live.unet, "text_encoder": live.text_encoder}
    attach_lora_file(models, a, "a", 1.0)
    attach_lora_file(models, b, "b", 0.5)
    torch.testing.assert_close(unet_out(merged), unet_out(live), atol=1e-4, rtol=1e-4)


def test_extract_reads_back_trained_factors():
    base = load_base("tiny")
    targets = unet_targets(base.unet, "attention")
    attach_lora(base.unet, plan_ranks(base.unet, targets, rank=4, alpha=2.0))
    extracted = extract_lora("unet", base.unet)
    assert sorted(extracted) == sorted(f"unet:{t}" for t in targets)
    mod = next(iter(extracted.values()))
    assert mod.rank == 4 and mod.alpha == pytest.approx(2.0) and torch.count_nonzero(mod.up) == 0


def test_candidate_keys_are_canonical():
    base = load_base("tiny")
    keys = candidate_keys({"unet": base.unet, "text_encoder": base.text_encoder})
    assert "text_encoder:text_model.encoder.layers.0.self_attn.q_proj" in keys
    assert any(k.startswith("unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") for k in keys)
