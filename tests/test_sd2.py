"""SD2.x 768-v on a small random base with SD2's exact topology (tuner.models.small): the loss target is v,
and a LoRA has kohya's SD2 names (SD1's diffusers-derived UNet names, Linear proj_in/proj_out, ``lora_te_``
for the 23-layer OpenCLIP-H text encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import assert_lora_image_matches_diffusers, small_recipe

from tuner.formats.io import read_header
from tuner.models.prompts import encode_conditioning
from tuner.models.small import small_base
from tuner.sample.generate import LoraSpec, load_loras_for
from tuner.train.batches import batch_at, latents_for
from tuner.train.loop import compute_loss, train
from tuner.train.objective import add_noise
from tuner.train.setup import setup_run

REFERENCE = Path(__file__).parent / "data" / "kohya_keys_canonical.json"  # copy of ../shared/reference
TE_MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def quiet(*_):
    pass


def test_sd2v_trains_on_v(circles, tmp_path):
    recipe = small_recipe(circles, tmp_path, train__batch_size=2, data__resolution=64, train__cache_latents=False)
    run = setup_run(recipe, base=small_base("sd2v"), log=quiet)
    assert run.base.prediction_type == "v_prediction" and run.base.family.name == "sd2v"
    loss = compute_loss(run, 0, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)  # the same draws, in the same order, by hand
    batch = batch_at(run.dataset, 0, 2)
    latents = latents_for(batch, vae=run.base.vae, latent_scale=run.base.latent_scale, generator=generator,
                          cache=None, device=run.device)
    noisy, noise, timesteps = add_noise(latents, run.noise_scheduler, generator)
    with torch.no_grad():
        pred = run.base.unet(noisy, timesteps, encoder_hidden_states=encode_conditioning(run.base, batch.captions).embeds).sample
    v = run.noise_scheduler.get_velocity(latents, noise, timesteps)
    assert torch.allclose(loss, F.mse_loss(pred, v), rtol=1e-4)
    assert not torch.allclose(loss, F.mse_loss(pred, noise), rtol=1e-2)


def test_sd2_lora_has_kohya_names(circles, tmp_path):
    recipe = small_recipe(
        circles, tmp_path, train__steps=1, train__batch_size=1, data__resolution=64, adapter__targets="kohya",
        adapter__rank=4, adapter__train_text_encoder=True, output__save_dtype="fp32",
    )
    base = small_base("sd2v")
    result = train(setup_run(recipe, base=base, log=quiet), log=quiet)
    metadata, header = read_header(result.outputs[0])
    sd15 = json.loads(REFERENCE.read_text())["sd15_lora"]
    unet = {k for k in sd15 if k.startswith("lora_unet_")}
    te = {f"lora_te_text_model_encoder_layers_{i}_{m}.{part}" for i in range(23) for m in TE_MODULES
          for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(header) == unet | te and len(te) == 138 * 3
    assert len(header["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"][1]) == 2  # Linear in SD2
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v2_v", "True")
    assert metadata["modelspec.prediction_type"] == "v"  # ModelSpec's spelling, as single files write it
    loaded = load_loras_for(small_base("sd2v"), [LoraSpec(result.outputs[0])])
    assert len(loaded[0].weights.modules) == len(header) // 3


def test_sd2_epsilon_trains_exports_and_samples(circles, tmp_path):
    """SD2.x 512 base (family sd2): the loss target is the noise, a few steps train a LoRA whose file says
    sd_v2 / epsilon, and the sampler applies it (the image changes)."""
    import numpy as np

    from tuner.sample.generate import apply_loras
    from tuner.sample.sampler import SampleSettings, sample_images

    recipe = small_recipe(
        circles, tmp_path, train__steps=3, train__batch_size=1, data__resolution=64, adapter__rank=4,
        optim__learning_rate=2e-2, output__save_dtype="fp32", train__cache_latents=False,
    )
    run = setup_run(recipe, base=small_base("sd2"), log=quiet)
    assert run.base.prediction_type == "epsilon" and run.base.family.name == "sd2"
    loss = compute_loss(run, 0, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)  # the same draws by hand
    batch = batch_at(run.dataset, 0, 1)
    latents = latents_for(batch, vae=run.base.vae, latent_scale=run.base.latent_scale, generator=generator,
                          cache=None, device=run.device)
    noisy, noise, timesteps = add_noise(latents, run.noise_scheduler, generator)
    with torch.no_grad():
        cond = encode_conditioning(run.base, batch.captions).embeds
        pred = run.base.unet(noisy, timesteps, encoder_hidden_states=cond).sample
    assert torch.allclose(loss, F.mse_loss(pred, noise), rtol=1e-4)
    assert not torch.allclose(loss, F.mse_loss(pred, run.noise_scheduler.get_velocity(latents, noise, timesteps)),
                              rtol=1e-2)

    result = train(run, log=quiet)
    metadata, _ = read_header(result.outputs[0])
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v2", "True")
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    settings = SampleSettings(steps=4, cfg=5.0, sampler="ddim", width=64, height=64)
    base = small_base("sd2")
    plain = np.asarray(sample_images(base, ["a white circle"], [1], settings)[0]).astype(int)
    apply_loras(base, load_loras_for(base, [LoraSpec(result.outputs[0])]))
    assert base.scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    tuned = np.asarray(sample_images(base, ["a white circle"], [1], settings)[0]).astype(int)
    assert np.abs(tuned - plain).max() > 2, "the trained LoRA should change the image"


def test_sd2v_lora_matches_diffusers_pipeline(circles, tmp_path):
    """The same kohya file applied by tuner's sampler and by diffusers' StableDiffusionPipeline
    (load_lora_weights) on SD2's topology with v-prediction gives the same image at the same seed (DDIM)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tuner.sample.sampler import SampleSettings

    recipe = small_recipe(
        circles, tmp_path, train__steps=4, train__batch_size=1, data__resolution=64, adapter__targets="kohya",
        adapter__rank=4, adapter__train_text_encoder=True, optim__learning_rate=2e-2, output__save_dtype="fp32",
    )
    lora = train(setup_run(recipe, base=small_base("sd2v"), log=quiet), log=quiet).outputs[0]
    prompt, settings = "a white circle on a green background", SampleSettings(steps=6, cfg=5.0, width=64, height=64)

    theirs_base = small_base("sd2v")
    assert theirs_base.scheduler_config["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline(
        scheduler=DDIMScheduler.from_config(theirs_base.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, **theirs_base.components, **theirs_base.tokenizers,
    )
    assert_lora_image_matches_diffusers(pipe, "sd2v", lora, prompt, settings)
