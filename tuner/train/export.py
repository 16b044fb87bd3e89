"""What a run writes besides checkpoints: the adapter files and preview grids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tuner.adapters.lora import extract_lora
from tuner.adapters.types import LoraWeights
from tuner.formats.io import save_safetensors
from tuner.formats.lorafile import save_lora
from tuner.formats.metadata import build_lora_metadata
from tuner.formats.peft import to_peft_state_dict
from tuner.sample.png import save_png
from tuner.sample.sampler import SampleSettings, grid, sample_images
from tuner.train.setup import Run

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def run_weights(run: Run) -> LoraWeights:
    """The trained adapter as canonical LoraWeights (unwrapped from accelerate/DDP)."""
    modules = {}
    for component, module in run.trained.items():
        modules.update(extract_lora(component, run.accelerator.unwrap_model(module)))
    return LoraWeights(modules=modules)


def training_metadata(run: Run) -> dict[str, str]:
    """kohya ``ss_*`` fields describing how the adapter was trained (strings; JSON for nested values)."""
    r, data = run.recipe, run.recipe.data
    resolution = data.resolution or run.base.family.resolution
    return {
        "ss_learning_rate": str(r.optim.learning_rate),
        "ss_unet_lr": str(r.optim.learning_rate),
        "ss_text_encoder_lr": str(r.optim.text_encoder_lr or r.optim.learning_rate),
        "ss_lr_scheduler": r.optim.schedule,
        "ss_lr_warmup_steps": str(r.optim.warmup_steps),
        "ss_optimizer": r.optim.optimizer,
        "ss_max_grad_norm": str(r.train.max_grad_norm),
        "ss_steps": str(len(run.history["loss"]) + 0),
        "ss_max_train_steps": str(r.train.steps),
        "ss_num_epochs": str(int(run.arithmetic.epochs + 0.999)),
        "ss_gradient_accumulation_steps": str(r.train.gradient_accumulation),
        "ss_gradient_checkpointing": str(r.train.gradient_checkpointing),
        "ss_batch_size_per_device": str(r.train.batch_size),
        "ss_total_batch_size": str(r.train.batch_size * r.train.gradient_accumulation),
        "ss_num_train_images": str(run.index.samples_per_epoch),
        "ss_num_reg_images": "0",
        "ss_mixed_precision": r.train.mixed_precision,
        "ss_seed": str(r.train.seed),
        "ss_noise_offset": str(r.train.noise_offset),
        "ss_min_snr_gamma": str(r.train.min_snr_gamma),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_cache_latents": str(r.train.cache_latents),
        "ss_flip_aug": str(data.flip),
        "ss_random_crop": str(not data.center_crop),
        "ss_shuffle_caption": str(data.shuffle_tags),
        "ss_keep_tokens": str(data.keep_tags),
        "ss_caption_dropout_rate": str(data.caption_dropout),
        "ss_enable_bucket": "False",
        "ss_clip_skip": "1",
        "ss_sd_model_name": Path(run.base.source).name,
        "ss_tag_frequency": json.dumps(run.index.tag_frequency_by_folder()),
        "ss_dataset_dirs": json.dumps(run.index.folder_summary()),
        "ss_training_finished_at": str(int(time.time())),
    }


def export_adapter(run: Run) -> list[Path]:
    """Write ``<name>.safetensors`` (kohya format), ``<name>.toml`` (the resolved recipe) and, when asked,
    ``<name>.peft.safetensors`` (diffusers/PEFT keys). Returns the written paths."""
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    name = run.recipe.output.name
    weights = run_weights(run)
    a = run.adapter
    resolution = run.recipe.data.resolution or run.base.family.resolution
    metadata = build_lora_metadata(
        family=run.base.family,
        rank=a.rank,
        alpha=a.alpha,
        network_args=run.method.network_args(a),
        output_name=name,
        training=training_metadata(run),
        tuner_block={
            "method": run.method.name,
            "family": run.base.family.name,
            "targets": a.targets,
            "train_text_encoder": a.train_text_encoder,
            "recipe_hash": run.recipe_hash,
            "base": run.base.source,
            "base_is_random": run.base.is_random,
        },
        title=name,
        trigger_words=list(run.recipe.output.trigger_words),
        resolution=resolution,
        prediction_type=run.base.prediction_type,
    )
    paths = []
    lora_path = out / f"{name}.safetensors"
    save_lora(lora_path, weights, run.base.family, dtype=SAVE_DTYPES[run.recipe.output.save_dtype], metadata=metadata)
    paths.append(lora_path)
    recipe_path = out / f"{name}.toml"
    tmp = recipe_path.with_suffix(".toml.tmp")
    tmp.write_text(run.recipe_toml, encoding="utf-8")
    tmp.replace(recipe_path)
    paths.append(recipe_path)
    if run.recipe.output.peft_export:
        tensors, peft_meta = to_peft_state_dict(weights)
        peft_path = out / f"{name}.peft.safetensors"
        save_safetensors(peft_path, tensors, peft_meta)
        paths.append(peft_path)
    return paths


@torch.no_grad()
def write_preview(run: Run, step: int) -> Path:
    """Sample the preview prompts with the adapter live (unmerged) and save a grid for this step."""
    p = run.recipe.preview
    for module in run.trained.values():
        module.eval()
    try:
        images = sample_images(
            run.base, p.prompts, [p.seed + i for i in range(len(p.prompts))],
            SampleSettings(steps=p.steps, cfg=p.cfg, sampler=p.sampler),
        )
    finally:
        for module in run.trained.values():
            module.train()
    path = run.out_dir / "previews" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid(images, cols=len(images)), path, parameters=f"preview at step {step}: " + " | ".join(p.prompts))
    return path
