"""The training loop: it learns, touches only the adapter, exports what it trained, resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import small_recipe

from tuner.adapters.lora import candidate_keys
from tuner.formats.kohya import kohya_name_table
from tuner.formats.lorafile import load_lora
from tuner.models.base import load_base
from tuner.train.export import run_weights
from tuner.train.loop import compute_loss, prepare_caches, restore, train
from tuner.train.setup import setup_run

QUIET = {"log": lambda *_: None}


def eval_loss(run, batches=6) -> float:
    """Loss on fixed micro-batches with fixed noise: comparable before and after training."""
    total = 0.0
    with torch.no_grad():
        for k in range(batches):
            total += compute_loss(run, k, torch.Generator().manual_seed(1000 + k)).item()
    return total / batches


def test_loss_falls_on_a_tiny_dataset(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, train__steps=40, optim__learning_rate=3e-3,
                                 adapter__targets="attention_ff_proj", train__batch_size=4), **QUIET)
    prepare_caches(run, **QUIET)
    before = eval_loss(run)
    train(run, **QUIET)
    after = eval_loss(run)
    assert after < 0.9 * before, (before, after)


def test_only_adapter_parameters_changed(trained_run):
    run, _ = trained_run
    fresh = load_base("tiny")
    for component in ("unet", "text_encoder", "vae"):
        reference = getattr(fresh, component).state_dict()
        current = {k.replace(".base_layer", ""): v for k, v in getattr(run.base, component).state_dict().items()
                   if ".lora_" not in k}
        assert current.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(current[name].cpu(), tensor), f"{component}.{name} changed"
    ups = [w.up for w in run_weights(run).modules.values()]
    assert all(torch.count_nonzero(u) > 0 for u in ups), "every LoRA up factor should have trained"


def test_export_reimports_identical_tensors(trained_run):
    run, result = trained_run
    expected = run_weights(run).modules
    models = {"unet": run.base.unet, "text_encoder": run.base.text_encoder}
    table = kohya_name_table(run.base.family, candidate_keys(models))
    loaded = load_lora(result.outputs[0], name_table=table)
    assert loaded.modules.keys() == expected.keys()
    assert any(k.startswith("text_encoder:text_model.") for k in loaded.modules)
    for key, mod in expected.items():
        assert torch.equal(loaded.modules[key].down, mod.down) and torch.equal(loaded.modules[key].up, mod.up)
        assert loaded.modules[key].alpha == mod.alpha
    assert [p.name for p in result.outputs] == ["t.safetensors", "t.peft.safetensors", "t.toml", "README.md"]
    peft = load_lora(result.outputs[1])
    for key, mod in expected.items():
        torch.testing.assert_close(peft.modules[key].delta(mod.up.shape[:1] + mod.down.shape[1:]),
                                   mod.delta(mod.up.shape[:1] + mod.down.shape[1:]))
    assert result.outputs[2].read_text().startswith("[model]")


def test_fp16_export_is_the_fp16_cast(trained_run, tmp_path):
    from tuner.formats.lorafile import save_lora

    run, _ = trained_run
    weights = run_weights(run)
    path = tmp_path / "h.safetensors"
    save_lora(path, weights, run.base.family, dtype=torch.float16, metadata={"ss_output_name": "h"})
    table = kohya_name_table(run.base.family, candidate_keys({"unet": run.base.unet,
                                                               "text_encoder": run.base.text_encoder}))
    loaded = load_lora(path, name_table=table)
    key = next(iter(weights.modules))
    assert torch.equal(loaded.modules[key].up, weights.modules[key].up.half().float())


@pytest.mark.parametrize("change", [{"optim__optimizer": "adamw8bit"}, {"train__gradient_checkpointing": True},
                                    {"train__gradient_accumulation": 2, "adapter__targets": "locon"},
                                    {"train__mixed_precision": "bf16"}])
def test_memory_options_train(circles, tmp_path, change):
    run = setup_run(small_recipe(circles, tmp_path, train__steps=2, **change), **QUIET)
    result = train(run, **QUIET)
    assert result.steps == 2 and torch.isfinite(torch.tensor(run.history["loss"])).all()
    assert any(torch.count_nonzero(m.up) for m in run_weights(run).modules.values())


def test_cached_and_uncached_latents_give_the_same_losses(circles, tmp_path):
    losses = []
    for cache in (True, False):
        run = setup_run(small_recipe(circles, tmp_path / str(cache), train__steps=3, train__cache_latents=cache),
                        **QUIET)
        train(run, **QUIET)
        losses.append(run.history["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_resume_matches_an_uninterrupted_run(circles, tmp_path):
    full = setup_run(small_recipe(circles, tmp_path / "full", train__steps=4), **QUIET)
    train(full, **QUIET)
    first = setup_run(small_recipe(circles, tmp_path / "part", train__steps=2, train__checkpoint_every=1), **QUIET)
    train(first, **QUIET)
    second = setup_run(small_recipe(circles, tmp_path / "part", train__steps=4), **QUIET)
    restore(second, tmp_path / "part" / "checkpoints" / "step_000002", **QUIET)
    train(second, **QUIET)
    assert second.history["loss"] == full.history["loss"]
    a, b = run_weights(full).modules, run_weights(second).modules
    assert all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a)


def test_resume_refuses_a_different_adapter(circles, tmp_path):
    from tuner.errors import TunerError

    first = setup_run(small_recipe(circles, tmp_path, train__steps=1), **QUIET)
    train(first, **QUIET)
    other = setup_run(small_recipe(circles, tmp_path, train__steps=2, adapter__rank=4), **QUIET)
    with pytest.raises(TunerError, match="adapter.rank"):
        restore(other, tmp_path / "checkpoints" / "step_000001", **QUIET)


def test_v_prediction_is_taken_from_the_scheduler_config():
    from diffusers import DDPMScheduler

    from tuner.train.objective import diffusion_loss, target_for

    sched = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    v = target_for("v_prediction", latents, noise, t, sched)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - s * latents)
    # min-SNR: at a low-noise timestep (huge SNR) the weight is gamma / SNR, far below 1
    pred = torch.zeros_like(noise)
    plain = diffusion_loss(pred, noise, t, sched, prediction_type="epsilon")
    weighted = diffusion_loss(pred, noise, t, sched, prediction_type="epsilon", min_snr_gamma=5.0)
    assert weighted[0] < 0.1 * plain[0] and weighted[1] == pytest.approx(plain[1])
