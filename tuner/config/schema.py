"""The recipe schema: typed, with every default in one place (STYLE.md #4).

A recipe file (TOML or YAML) has one table per dataclass below (``[model]``, ``[data]``, ``[adapter]``,
``[train]``, ``[optim]``, ``[preview]``, ``[output]``). Components never import this module; the setup code
reads a :class:`Recipe` and passes plain arguments on (STYLE.md #5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    base: str = "tiny"
    """``tiny`` (the embedded base) or a local diffusers folder (SD1.x layout). Never a hub id."""


@dataclass
class DataConfig:
    path: str = ""
    """Folder of images with same-named .txt captions, kohya ``N_name`` repeat folders, or metadata.jsonl."""
    instance_prompt: str = ""
    """Caption used for an image that has no caption of its own."""
    repeats: int = 1
    """Times each image is seen per epoch (a ``N_name`` folder's N overrides it for that folder)."""
    resolution: int = 0
    """Square training size in pixels; 0 = the base family's native resolution."""
    center_crop: bool = True
    """Centre crop after resizing the short side; false = random crop (needs cache_latents = false)."""
    flip: bool = False
    """Random horizontal flip (p = 0.5)."""
    caption_dropout: float = 0.0
    """Probability of training on the empty caption (helps classifier-free guidance)."""
    shuffle_tags: bool = False
    """Shuffle comma-separated tags of each caption every time it is used."""
    keep_tags: int = 0
    """With shuffle_tags: number of leading tags kept in place (the trigger word, typically)."""
    strict: bool = False
    """Unreadable images are errors instead of reported skips."""


@dataclass
class AdapterConfig:
    method: Literal["lora"] = "lora"
    targets: Literal["attention", "attention_ff_proj", "kohya", "locon"] = "attention"
    """UNet modules to adapt: attention q/k/v/out (default); + feed-forward and proj_in/out; ``kohya`` =
    every Linear/Conv in transformer blocks (kohya's default set); ``locon`` = kohya + ResNet/down/up
    sampler convs and time-embedding projections."""
    rank: int = 8
    alpha: float = 8.0
    """Scale = alpha / rank. Stored as is in the exported file (never rewritten to the rank)."""
    conv_rank: int = 4
    """Rank of 3x3 conv modules in the ``locon`` preset."""
    conv_alpha: float = 4.0
    dropout: float = 0.0
    train_text_encoder: bool = False
    text_encoder_rank: int = 0
    """0 = same as rank."""
    text_encoder_alpha: float = 0.0
    """0 = same as alpha."""


@dataclass
class TrainConfig:
    steps: int = 400
    """Optimizer steps (the step arithmetic derived from it is printed before training)."""
    batch_size: int = 2
    gradient_accumulation: int = 1
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    """Encode images once (VAE frozen); the VAE leaves the device afterwards."""
    cache_prompts: bool = True
    """Encode each distinct caption once when the text encoder is frozen."""
    min_snr_gamma: float = 0.0
    """Min-SNR loss weighting; 0 = off, 5 is the usual value."""
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    """0 = no gradient clipping."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first); 0 = keep all."""
    device: str = "auto"
    """``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:1``..."""


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    learning_rate: float = 1e-4
    text_encoder_lr: float = 0.0
    """0 = same as learning_rate."""
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0


@dataclass
class PreviewConfig:
    every: int = 0
    """Write a preview grid every N steps (0 = none)."""
    prompts: list[str] = field(default_factory=list)
    steps: int = 20
    cfg: float = 5.0
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m"] = "ddim"
    seed: int = 0


@dataclass
class OutputConfig:
    dir: str = "runs/lora"
    name: str = "lora"
    """File stem of the exported adapter (also ``ss_output_name``, the alias A1111 shows)."""
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    peft_export: bool = False
    """Also write a diffusers/PEFT-format file (``<name>.peft.safetensors``) for diffusers-only users."""
    trigger_words: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Convenience CLI options every recipe accepts, as dotted keys (``tuner train --steps 10``).
CLI_SHORTCUTS: dict[str, str] = {
    "base": "model.base",
    "data": "data.path",
    "output": "output.dir",
    "steps": "train.steps",
    "seed": "train.seed",
    "resolution": "data.resolution",
    "batch_size": "train.batch_size",
    "rank": "adapter.rank",
    "checkpoint_every": "train.checkpoint_every",
}
