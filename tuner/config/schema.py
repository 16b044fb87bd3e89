"""The recipe schema: typed, with every default in one place (STYLE.md #4).

A recipe file (TOML or YAML) has one table per dataclass below (``[model]``, ``[data]``, ``[adapter]``,
``[embedding]``, ``[prior]``, ``[train]``, ``[optim]``, ``[preview]``, ``[output]``). Components never import this module; the setup code
reads a :class:`Recipe` and passes plain arguments on (STYLE.md #5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    base: str = "tiny"
    """``tiny`` (the embedded base), a local diffusers folder (SD1.x, SD2.x, SDXL) or a single-file checkpoint
    (``.safetensors`` in the LDM layout). Never a hub id."""
    prediction_type: Literal["auto", "epsilon", "v"] = "auto"
    """For an SD2.x single file, whose weights do not say it: ``epsilon`` (SD2.x 512) or ``v`` (768-v).
    ``auto``: from the folder's scheduler config or the file's tuner metadata (an SD2.x file without it is
    refused with this hint)."""
    vae_dtype: Literal["auto", "fp32"] = "auto"
    """``auto``: the VAE is stored like the other frozen weights (see train.weight_dtype); ``fp32`` keeps it in
    fp32 (the SD1.x/SDXL VAEs overflow to NaN in fp16; costs 2 bytes per VAE weight while it is on the device)."""

    @property
    def prediction(self) -> str | None:
        """``prediction_type`` as ``load_base`` takes it (``None`` for ``auto``)."""
        return None if self.prediction_type == "auto" else self.prediction_type


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
    alpha_background: list[int] = field(default_factory=lambda: [255, 255, 255])
    """RGB colour (0-255 each) that transparent pixels (RGBA, LA, palette transparency) are composited on."""
    bucketing: bool = False
    """Aspect-ratio buckets (kohya's enable_bucket): each image trains at the bucket of about
    resolution x resolution pixels whose aspect ratio is nearest its own, instead of a centre square."""
    bucket_step: int = 0
    """Step of bucket sides in px; 0 = the family's (64 for SD1/SD2/SDXL as in kohya, 16 for tiny)."""
    min_bucket_reso: int = 0
    """Shortest bucket side in px; 0 = resolution / 2 (kohya's 256 at 512 px)."""
    max_bucket_reso: int = 0
    """Longest bucket side in px; 0 = resolution x 2 (kohya's 1024 at 512 px)."""
    bucket_no_upscale: bool = False
    """Buckets from the images' own sizes: an image within the area keeps its size (sides rounded down to
    the step, cropped), a larger one is scaled down to the area; none is enlarged. Ignores min/max_bucket_reso."""


@dataclass
class AdapterConfig:
    method: Literal["lora", "dreambooth", "textual_inversion", "pivotal"] = "lora"
    """``lora`` (LoRA/LoCon; with ``[prior]`` enabled this is DreamBooth-LoRA), ``dreambooth`` (full fine-tune
    of the UNet, and of the text encoder with train_text_encoder), ``textual_inversion`` (new token vectors
    only, see ``[embedding]``), ``pivotal`` (textual inversion and LoRA together)."""
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
class EmbeddingConfig:
    """Placeholder tokens for ``textual_inversion`` and ``pivotal``."""

    tokens: list[str] = field(default_factory=list)
    """New tokens to learn, e.g. ``["<pink>"]``; each must be absent from the base's vocabulary."""
    init_words: list[str] = field(default_factory=list)
    """One word per token whose embedding initialises its vectors (e.g. ``["pink"]``): a word close to the
    concept, known to the base's tokenizer."""
    vectors: int = 1
    """Vectors per token (``<tok>`` is written as ``<tok> <tok>_1 ...`` to the text encoder)."""
    learning_rate: float = 5e-3
    """Learning rate of the token vectors (their own parameter group)."""
    a1111_bundle: bool = False
    """``pivotal``: also write ``<name>.bundle.safetensors``, the LoRA with ``bundle_emb.*`` keys (A1111)."""


@dataclass
class PriorConfig:
    """DreamBooth prior preservation: class images generated by the base (before training) and trained on
    beside the instance images, so the class word keeps its meaning."""

    enabled: bool = False
    class_prompts: list[str] = field(default_factory=list)
    """Prompts for the class images, used in turn (e.g. ``["a star on a black background"]``)."""
    class_dir: str = ""
    """Folder of class images with .txt captions; images already there are reused and only the missing ones
    are generated. "" = ``<output.dir>/class_images``."""
    num_images: int = 50
    loss_weight: float = 1.0
    """Weight of the class images' loss against the instance images' loss."""
    steps: int = 25
    """Sampler steps when generating class images."""
    cfg: float = 5.0
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m"] = "ddim"
    seed: int = 0
    batch_size: int = 1
    """Class images denoised together: faster where a sampler step is overhead-bound (small models, GPUs:
    the tiny base draws about 2x faster at 8 on 2 CPU cores); 1 keeps memory flat. An image does not depend
    on its batch (its noise comes from its own seed), up to the float rounding of batched kernels."""


@dataclass
class TrainConfig:
    steps: int = 400
    """Optimizer steps (the step arithmetic derived from it is printed before training)."""
    batch_size: int = 2
    gradient_accumulation: int = 1
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast the forward passes in fp16/bf16 (trained weights stay fp32; fp16 adds a gradient scaler)."""
    weight_dtype: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    """Storage of the frozen weights: ``auto`` = the mixed_precision dtype while autocast is active (half the
    memory of fp32), else fp32; ``fp32`` always. ``bf16`` / ``fp8`` store the frozen Linear and Conv2d weights of
    the UNet and text encoders narrower than they compute (fp32, or the autocast dtype): each layer widens its
    weight for its own matmul only. bf16 halves fp32 storage (rounding to 8 mantissa bits); fp8 (e4m3, one
    scale per output channel) quarters it, like kohya's ``--fp8_base``. Trained tensors are fp32 either way."""
    shard_frozen: bool = False
    """With several processes: each keeps only 1/N of every frozen Linear/Conv2d weight of the UNet and gathers
    a layer's whole weight from the others for its own matmul, forward and backward (what FSDP's FULL_SHARD
    / ZeRO stage 3 do, for the weights that do not train). For adapter methods (LoRA, pivotal, textual
    inversion), where the frozen UNet is most of the memory; combines with weight_dtype. Costs two gathers
    per layer per step. Previews then run on every process (only the main one writes them)."""
    gradient_checkpointing: bool = False
    """Recompute each UNet block in backward instead of keeping its activations (about 1/3 more compute)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """UNet/VAE attention: ``sdpa`` (torch's scaled_dot_product_attention: flash/memory-efficient kernels on
    GPUs) or ``eager`` (the plain matmul-softmax-matmul; keeps the full attention matrix)."""
    channels_last: bool = False
    """Store the UNet in the channels-last memory layout (faster convolutions with fp16/bf16 on NVIDIA tensor
    cores; no gain, often a loss, on CPUs)."""
    cache_latents: bool = True
    """Encode images once (VAE frozen); the VAE leaves the device afterwards."""
    cache_prompts: bool = True
    """Encode every caption once before training when the text encoder is frozen, then move the text encoder
    off the device. With data.shuffle_tags the captions change every step: they are encoded as they come and
    the text encoder stays on the device."""
    min_snr_gamma: float = 0.0
    """Min-SNR loss weighting; 0 = off, 5 is the usual value."""
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    """0 = no gradient clipping."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a NaN/inf loss or gradient (each one is skipped)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first); 0 = keep all."""
    device: str = "auto"
    """``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:1``..."""
    ema_decay: float = 0.0
    """Exponential moving average of the trained weights (e.g. 0.999), used for previews and export; 0 = off."""
    ema_on_cpu: bool = False
    """Keep the EMA copy in CPU memory instead of on the training device."""
    log_with: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log loss, learning rate, gradient norm and previews to TensorBoard (``<output>/logs/tensorboard``)
    or Weights & Biases (offline unless configured); each needs its package installed."""


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    """``adamw8bit`` (bitsandbytes) keeps optimizer state in 8 bits: about 75% less state memory.
    ``adafactor`` (transformers; relative_step off, so learning_rate and the schedule apply as given) keeps
    only a factored second moment (a row and a column per matrix) and no first moment; betas, eps are unused."""
    fused_backward: bool = False
    """Step the optimizer for each tensor as soon as its gradient is ready, inside backward, and free that
    gradient: the full set of gradients never exists at once (for full fine-tunes). Needs
    train.gradient_accumulation = 1, train.max_grad_norm = 0 and no fp16 (bf16 or no)."""
    shard_states: bool = False
    """With several processes (``--processes N``, accelerate, torchrun): each process keeps the optimizer
    states of only 1/N of the trained tensors, steps those, and sends the new weights to the others (ZeRO
    stage 1, torch's ``ZeroRedundancyOptimizer``). Same weights as without it; it pays off for full
    fine-tunes, whose AdamW states are 8 bytes per weight. No effect with one process."""
    shard_gradients: bool = False
    """ZeRO stage 2: with several processes, also the averaged gradients are split: each process keeps only
    those of the tensors whose states it owns. They are sent in buckets during backward as they become
    ready, so the whole set never exists on one process. Implies shard_states; no fp16 (use bf16 or no).
    Same weights as without it; it pays off for full fine-tunes (4 bytes per trained fp32 weight)."""
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
    model_format: Literal["diffusers", "single-file"] = "diffusers"
    """DreamBooth: write the fine-tuned model as a diffusers folder ``model/`` or as one ``model.safetensors``
    in the original LDM layout that A1111 and ComfyUI load (SD1.x)."""
    trigger_words: list[str] = field(default_factory=list)
    license: str = ""
    """Licence id for the model card (``README.md`` beside the adapter), e.g. ``"mit"``; "" = the base's."""


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Convenience CLI options every recipe accepts, as dotted keys (``tuner train --steps 10``).
CLI_SHORTCUTS: dict[str, str] = {
    "base": "model.base",
    "prediction_type": "model.prediction_type",
    "data": "data.path",
    "output": "output.dir",
    "steps": "train.steps",
    "seed": "train.seed",
    "resolution": "data.resolution",
    "batch_size": "train.batch_size",
    "rank": "adapter.rank",
    "checkpoint_every": "train.checkpoint_every",
    "min_bucket_reso": "data.min_bucket_reso",
    "max_bucket_reso": "data.max_bucket_reso",
}
