"""A LoRA trained by tuner, loaded by diffusers' own pipeline, gives the image tuner's sampler gives."""

from __future__ import annotations

import numpy as np
import torch

from tuner.models.base import export_base, load_base
from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for
from tuner.sample.sampler import SampleSettings, sample_images

PROMPT = "a white circle on a green background"


def test_diffusers_pipeline_matches_tuner_sample(trained_run, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    _, result = trained_run
    lora = result.outputs[0]
    folder = export_base(load_base("tiny"), tmp_path / "base")

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = np.asarray(
        pipe(PROMPT, num_inference_steps=12, guidance_scale=5.0, generator=torch.Generator().manual_seed(7)).images[0]
    )
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    theirs = np.asarray(
        pipe(PROMPT, num_inference_steps=12, guidance_scale=5.0, generator=torch.Generator().manual_seed(7)).images[0]
    )

    base = load_base(str(folder))
    apply_loras(base, load_loras_for(base, [LoraSpec(lora)]))
    ours = np.asarray(sample_images(base, [PROMPT], [7], SampleSettings(steps=12, cfg=5.0, sampler="ddim"))[0])

    assert np.abs(theirs.astype(int) - reference.astype(int)).max() > 8, "the LoRA should visibly change the image"
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2


def test_a_batched_image_is_the_image_drawn_alone():
    """Each image's starting and ancestral noise come from its own seed: batching changes nothing but the
    float rounding of batched kernels (at most one level of one channel)."""
    base = load_base("tiny")
    prompts = ["a red star on a blue background", "a small green circle on a black background",
               "a white heart at the top left on a red background"]
    seeds = [3, 11, 5]
    for sampler in ("ddim", "euler_a"):
        alone = sample_images(base, prompts, seeds, SampleSettings(steps=6, sampler=sampler))
        batched = sample_images(base, prompts, seeds, SampleSettings(steps=6, sampler=sampler, batch_size=2))
        assert len(batched) == 3
        for a, b in zip(alone, batched, strict=True):
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert diff.max() <= 1, sampler
        # and the seeds matter: a batch of one prompt under two seeds gives two images
        twins = sample_images(base, prompts[:1] * 2, [1, 2], SampleSettings(steps=6, sampler=sampler, batch_size=2))
        assert np.abs(np.asarray(twins[0], dtype=int) - np.asarray(twins[1], dtype=int)).max() > 20
