"""What a run writes besides checkpoints: the adapter files and preview grids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tuner.adapters.lora import extract_lora
from tuner.adapters.types import COMPONENTS, LoraWeights
from tuner.errors import TunerError
from tuner.formats.io import SAVE_DTYPES, save_safetensors, write_bytes_atomic
from tuner.formats.lorafile import save_lora
from tuner.formats.metadata import build_lora_metadata
from tuner.formats.peft import to_peft_state_dict
from tuner.optim.memory import restore_frozen
from tuner.sample.png import save_png
from tuner.sample.sampler import SampleSettings, grid, sample_images
from tuner.train.card import CardFacts, write_card
from tuner.train.setup import Run


def run_weights(run: Run) -> LoraWeights:
    """The trained adapter as canonical LoraWeights (unwrapped from accelerate/DDP)."""
    modules = {}
    for component, module in run.trained.items():
        if component not in COMPONENTS:  # "embedding": token vectors, not LoRA layers
            continue
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
        "ss_total_batch_size": str(run.arithmetic.samples_per_step),  # x processes when data-parallel
        "ss_num_train_images": str(run.index.samples_per_epoch),
        "ss_num_reg_images": str(len(run.class_dataset.index.items) if run.class_dataset else 0),
        "ss_prior_loss_weight": str(r.prior.loss_weight if r.prior.enabled else 0.0),
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
    """Write what the run's method saves (``Method.saves``), ``<name>.toml`` (the resolved recipe) and the
    model card ``README.md`` into the output folder; returns the written paths. Every file is written to a
    temporary name and renamed."""
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for kind in run.method.saves:
        paths += WRITERS[kind](run)
    recipe_path = out / f"{run.recipe.output.name}.toml"
    write_bytes_atomic(recipe_path, run.recipe_toml.encode("utf-8"))
    paths.append(recipe_path)
    paths.append(write_card(card_facts(run, paths), out))
    return paths


def card_facts(run: Run, files: list[Path]) -> CardFacts:
    """What the model card says about this run (see :mod:`tuner.train.card`)."""
    r, a = run.recipe, run.adapter
    settings = {"method": run.method.name}
    if run.method.name != "textual_inversion":
        settings["targets"] = a.targets
        settings["rank / alpha"] = f"{a.rank} / {a.alpha:g}"
        settings["text encoder trained"] = str(a.train_text_encoder).lower()
    if a.tokens:
        settings["tokens (vectors)"] = ", ".join(f"{t} ({a.vectors})" for t in a.tokens)
    lr = f"{r.optim.learning_rate:g}" + (f", text encoder {r.optim.text_encoder_lr:g}" if r.optim.text_encoder_lr else "")
    settings.update({
        "steps": str(len(run.history["loss"])),
        "batch x accumulation": f"{r.train.batch_size} x {r.train.gradient_accumulation}",
        "learning rate": lr,
        "optimizer, schedule": f"{r.optim.optimizer}, {r.optim.schedule} (warm-up {r.optim.warmup_steps})",
        "resolution": str(r.data.resolution or run.base.family.resolution),
        "images (samples per epoch)": f"{run.index.num_images} ({run.index.samples_per_epoch})",
        "epochs": f"{run.arithmetic.epochs:.2f}",
        "mixed precision, saved as": f"{r.train.mixed_precision}, {r.output.save_dtype}",
        "seed": str(r.train.seed),
    })
    if r.prior.enabled:
        settings["prior preservation"] = f"{r.prior.num_images} class images, loss weight {r.prior.loss_weight:g}"
    if r.train.ema_decay:
        settings["EMA decay"] = f"{r.train.ema_decay:g}"
    if r.train.min_snr_gamma:
        settings["min-SNR gamma"] = f"{r.train.min_snr_gamma:g}"
    if r.train.noise_offset:
        settings["noise offset"] = f"{r.train.noise_offset:g}"
    previews = sorted((run.out_dir / "previews").glob("step_*.png"))[-3:]
    samples = [(f"{' | '.join(r.preview.prompts)} (step {int(p.stem[5:])})", p) for p in previews]
    return CardFacts(
        name=r.output.name, method=run.method.name, family=run.base.family.name,
        family_description=run.base.family.description, base=r.model.base, trigger_words=trigger_words(run),
        instance_prompt=r.data.instance_prompt, license=r.output.license, settings=settings, files=files,
        samples=samples, recipe_path=run.recipe_path,
    )


def trigger_words(run: Run) -> list[str]:
    """The recipe's trigger words, or the new tokens of an embedding method when none are given."""
    return list(run.recipe.output.trigger_words) or list(run.adapter.tokens)


def lora_metadata(run: Run, weights: LoraWeights, *, rank: int, alpha: float, extra: dict | None = None) -> dict[str, str]:
    a = run.adapter
    return build_lora_metadata(
        family=run.base.family,
        rank=rank,
        alpha=alpha,
        network_args=run.method.network_args(a),
        output_name=run.recipe.output.name,
        training=training_metadata(run),
        tuner_block={
            "method": run.method.name,
            "family": run.base.family.name,
            "targets": a.targets,
            "train_text_encoder": a.train_text_encoder,
            "prior_preservation": run.recipe.prior.enabled,
            "ema_decay": run.recipe.train.ema_decay,
            "recipe_hash": run.recipe_hash,
            "base": run.base.source,
            "base_is_random": run.base.is_random,
            **(extra or {}),
        },
        title=run.recipe.output.name,
        trigger_words=trigger_words(run),
        resolution=run.recipe.data.resolution or run.base.family.resolution,
        prediction_type=run.base.prediction_type,
    )


def write_lora(run: Run) -> list[Path]:
    """``<name>.safetensors`` (kohya), ``<name>.peft.safetensors`` on request, and for pivotal tuning with
    ``embedding.a1111_bundle`` also ``<name>.bundle.safetensors`` (the LoRA plus ``bundle_emb.*`` keys)."""
    out, name = run.out_dir, run.recipe.output.name
    weights = run_weights(run)
    metadata = lora_metadata(run, weights, rank=run.adapter.rank, alpha=run.adapter.alpha)
    dtype = SAVE_DTYPES[run.recipe.output.save_dtype]
    paths = [out / f"{name}.safetensors"]
    save_lora(paths[0], weights, run.base.family, dtype=dtype, metadata=metadata)
    if run.recipe.output.peft_export:
        tensors, peft_meta = to_peft_state_dict(weights)
        paths.append(out / f"{name}.peft.safetensors")
        save_safetensors(paths[-1], tensors, peft_meta)
    if "embedding" in run.trained and run.recipe.embedding.a1111_bundle:
        from tuner.formats.embeddings import bundle_keys
        from tuner.formats.kohya import to_kohya_state_dict
        from tuner.formats.metadata import finalize_lora_file

        tensors = to_kohya_state_dict(weights, run.base.family, dtype=dtype)
        for token in run.adapter.tokens:
            tensors.update(bundle_keys(token, {k: v.to(dtype) for k, v in token_vectors(run, token).items()}))
        paths.append(out / f"{name}.bundle.safetensors")
        save_safetensors(paths[-1], tensors, finalize_lora_file(tensors, metadata))
    return paths


def token_vectors(run: Run, token: str) -> dict[str, torch.Tensor]:
    """``token``'s learned vectors (fp32, CPU) by the family's embedding-file key: ``{"text_encoder": [n, D]}``,
    or for SDXL ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``."""
    from tuner.adapters.embedding import placeholder_component

    return {
        spec.embedding_key: run.accelerator.unwrap_model(run.trained[placeholder_component(spec.component)]).vectors(token)
        for spec in run.base.family.text_encoders
    }


def embedding_stem(token: str) -> str:
    """A file stem for ``token`` that is valid on every OS (``<pink>`` -> ``pink``). A1111 and ComfyUI use the
    file stem as the embedding's name in prompts."""
    stem = "".join(c for c in token if c.isalnum() or c in "-_")
    return stem or "embedding"


def write_embeddings(run: Run) -> list[Path]:
    """Per token: ``embeddings/<stem>.safetensors`` (kohya ``emb_params``, SDXL ``clip_l`` + ``clip_g``: A1111,
    ComfyUI, kohya) and the diffusers layout ``{token: vectors}`` for ``load_textual_inversion``:
    ``embeddings/<stem>.diffusers.safetensors``, and for SDXL's second encoder ``<stem>.diffusers_2.safetensors``
    (as ``tuner convert --to diffusers`` writes them)."""
    from tuner.formats.embeddings import (
        SINGLE_KEY,
        build_embedding_metadata,
        save_diffusers_embedding,
        save_kohya_embedding,
    )

    dtype = SAVE_DTYPES[run.recipe.output.save_dtype]
    folder = run.out_dir / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for token in run.adapter.tokens:
        vectors = {k: v.to(dtype) for k, v in token_vectors(run, token).items()}
        n = int(next(iter(vectors.values())).shape[0])
        stem = embedding_stem(token)
        metadata = build_embedding_metadata(
            family=run.base.family, token=token, n_vectors=n, title=stem,
            tuner_block={"method": run.method.name, "vectors": n, "recipe_hash": run.recipe_hash,
                         "base": run.base.source},
        )
        metadata.update({
            "ss_output_name": stem,
            "ss_steps": str(len(run.history["loss"])),
            "ss_base_model_version": run.base.family.ss_base_model_version,
        })
        paths.append(folder / f"{stem}.safetensors")
        save_kohya_embedding(paths[-1], vectors[SINGLE_KEY] if SINGLE_KEY in vectors else vectors, metadata)
        for i, rows in enumerate(vectors.values()):
            paths.append(folder / f"{stem}.diffusers{f'_{i + 1}' if i else ''}.safetensors")
            save_diffusers_embedding(paths[-1], token, rows)
    return paths


def write_model(run: Run) -> list[Path]:
    """DreamBooth: the fine-tuned base as a diffusers folder ``model/`` (or, with ``output.model_format =
    "single-file"``, one LDM-layout ``model.safetensors``), ``<name>.safetensors``, a LoRA of
    rank ``adapter.rank`` extracted by SVD from the difference to the original base, and
    ``<name>.extract.txt``, how much of each module's difference that rank keeps (worst modules first)."""
    from tuner.adapters.extract import extract_lora as extract_from_models
    from tuner.adapters.extract import format_report
    from tuner.models.base import BaseModel, export_base, load_base

    parts = {name: run.accelerator.unwrap_model(module) for name, module in run.base.components.items()}
    for module in parts.values():  # frozen weights stored narrow (train.weight_dtype bf16/fp8) are written wide
        restore_frozen(module)
    tuned = BaseModel(
        family=run.base.family,
        scheduler_config=run.base.scheduler_config,
        source=str(run.out_dir / "model"),
        **parts,
        **run.base.tokenizers,
    )
    if run.recipe.output.model_format == "single-file":
        from tuner.models.single_file import save_single_file

        folder = save_single_file(
            run.out_dir / "model.safetensors", tuned.family, tuned.components,
            dtype=SAVE_DTYPES[run.recipe.output.save_dtype], prediction_type=tuned.prediction_type,
        )
    else:
        folder = export_base(tuned, run.out_dir / "model")
    original = load_base(run.recipe.model.base, prediction_type=run.recipe.model.prediction)
    a = run.adapter
    result = extract_from_models(
        original, tuned, rank=a.rank, conv_rank=a.conv_rank if a.targets == "locon" else None,
        text_encoder=a.train_text_encoder,
    )
    weights = result.weights
    if result.is_empty:
        raise TunerError(f"DreamBooth export: the fine-tuned model in '{folder}' does not differ from the base, so "
                         "no LoRA can be extracted (was the learning rate 0?). The model folder is written.")
    lora_path = run.out_dir / f"{run.recipe.output.name}.safetensors"
    metadata = lora_metadata(run, weights, rank=a.rank, alpha=float(a.rank),
                             extra={"extracted_retained_energy_mean": result.summary.mean_retained})
    save_lora(lora_path, weights, run.base.family, dtype=SAVE_DTYPES[run.recipe.output.save_dtype], metadata=metadata)
    report = run.out_dir / f"{run.recipe.output.name}.extract.txt"
    write_bytes_atomic(report, (format_report(result, rows=20) + "\n").encode("utf-8"))
    return [folder, lora_path, report]


WRITERS = {"lora": write_lora, "embedding": write_embeddings, "model": write_model}


@torch.no_grad()
def write_preview(run: Run, step: int, *, write: bool = True) -> Path:
    """Sample the preview prompts with the adapter live (unmerged) and save a grid for this step (``write``
    false: sample only, as the other processes do when the frozen weights are sharded between them)."""
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
    if not write:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid(images, cols=len(images)), path, parameters=f"preview at step {step}: " + " | ".join(p.prompts))
    return path
