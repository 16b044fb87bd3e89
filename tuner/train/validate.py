"""``tuner validate``: everything that can be checked about a recipe without loading a model.

The recipe's own problems (types, unknown keys, ranges) are reported by :func:`tuner.config.load.load_recipe`;
this adds what needs the disk: the base's path and family (from its JSON configs only), the data folder
(images decoded, captions read, the step arithmetic), textual-inversion tokens in the captions, the
class-image cache, the output folder, optional packages and the device. Every problem is collected.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from tuner.config.schema import Recipe
from tuner.data.dataset import TrainDataset
from tuner.data.folder import scan_dataset
from tuner.errors import TunerError
from tuner.models.base import check_base_spec
from tuner.train.prior import count_images
from tuner.train.setup import (
    StepArithmetic,
    bucket_plan,
    check_tokens_in_captions,
    class_image_dir,
    output_folder_problems,
    pick_device,
)
from tuner.train.tracking import missing_package


@dataclass
class Validation:
    arithmetic: StepArithmetic | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def validate_recipe(recipe: Recipe) -> Validation:
    """Check a type-correct recipe against the disk and this machine; never loads a model."""
    v = Validation()
    family = None
    try:
        family = check_base_spec(recipe.model.base, prediction_type=recipe.model.prediction)
        v.notes.append(f"base: {recipe.model.base} (family {family.name}, {family.resolution} px)")
        if recipe.output.model_format == "single-file" and family.configs is None:
            v.problems.append(f"output.model_format: 'single-file' (the LDM layout) is written for SD1.x, SD2.x "
                              f"and SDXL bases, not {family.name}; use 'diffusers'")
    except TunerError as exc:
        v.problems.append(f"model.base: {exc}")
    index = None
    if not recipe.data.path:
        v.problems.append("data.path: no training data (set data.path in the recipe or pass --data FOLDER)")
    else:
        try:
            index = scan_dataset(recipe.data.path, instance_prompt=recipe.data.instance_prompt,
                                 default_repeats=recipe.data.repeats, strict=recipe.data.strict)
        except TunerError as exc:
            v.problems.append(f"data.path: {exc}")
    if index is not None:
        for path, reason in index.skipped:
            v.notes.append(f"will skip {path}: {reason}")
        resolution = recipe.data.resolution or (family.resolution if family is not None else 0)
        buckets = None
        if recipe.data.bucketing and family is not None:
            try:
                buckets = bucket_plan(recipe, index, resolution, family.bucket_step)
            except TunerError as exc:
                v.problems.append(f"data.bucketing: {exc}")
        v.notes.append(index.summary(0 if recipe.data.bucketing else resolution))
        batches = 0
        if buckets is not None:
            v.notes.append(buckets.summary())
            dataset = TrainDataset(index, resolution=resolution, buckets=buckets)  # decodes nothing
            batches = dataset.batches_per_epoch(recipe.train.batch_size)
        v.arithmetic = StepArithmetic(
            images=index.num_images, samples_per_epoch=index.samples_per_epoch, batch_size=recipe.train.batch_size,
            accumulation=recipe.train.gradient_accumulation, steps=recipe.train.steps, batches_per_epoch=batches,
        )
        if recipe.adapter.method in ("textual_inversion", "pivotal"):
            try:
                check_tokens_in_captions(index, recipe.embedding.tokens, recipe.data.path)
            except TunerError as exc:
                v.problems.append(f"embedding.tokens: {exc}")
    if recipe.prior.enabled:
        folder = class_image_dir(recipe)
        have = count_images(folder)
        missing = max(0, recipe.prior.num_images - have)
        v.notes.append(f"class images: {have} in '{folder}', {missing} to generate before training")
        if missing and not recipe.prior.class_prompts:
            v.problems.append(f"prior.class_prompts: empty, and '{folder}' lacks {missing} class images")
    v.problems += output_folder_problems(recipe)
    tracker_problem = missing_package(recipe.train.log_with)
    if tracker_problem:
        v.problems.append(tracker_problem)
    if recipe.optim.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        v.problems.append("optim.optimizer = 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, or "
                          "set optim.optimizer = \"adamw\"")
    try:
        v.notes.append(f"device: {pick_device(recipe.train.device)}")
    except TunerError as exc:
        v.problems.append(f"train.device: {exc}")
    return v
