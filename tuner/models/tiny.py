"""The embedded tiny base: configs, tokenizer vocabulary and construction.

``tuner pretrain-tiny`` builds the base from these configs; the shipped weights (``tuner/tiny/assets``)
carry their own configs, and a checkout without them builds random weights from these with a fixed seed.
Tensor conventions are SD1's: images in [-1, 1], 64 px; latents 16x16x4 (the VAE downsamples 4x; 32x32x4
with ``--latent-factor 2``); prompt embeds ``[B, 32, 128]``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

# Words of the toy world (../WORLD.md) plus the rare word `sks`, each one token. Anything else falls back
# to single characters, so any prompt tokenizes; textual inversion adds new tokens with add_tokens().
WORLD_WORDS = (
    "a on the in background left center right small large outline style sks "
    "red orange yellow green blue purple white black "
    "circle square triangle diamond star heart cross ring"
).split()
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-<>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 1.0,
}
LATENT_FACTORS = (4, 2)
"""Pixels per latent cell that ``tuner pretrain-tiny --latent-factor`` can build: 4 is the shipped base's
(16x16 latents); 2 is the finer candidate (32x32 latents) that keeps a 20 px subject's detail."""


def vae_config(latent_factor: int = 4) -> dict[str, Any]:
    """The tiny VAE's config for ``latent_factor`` (see :data:`LATENT_FACTORS`); 4 is :data:`VAE_CONFIG`.

    Factor 2 drops the last downsampling block: one 64-channel stage at 32x32 instead of two at 32 and 16.
    """
    if latent_factor == 4:
        return dict(VAE_CONFIG)
    if latent_factor == 2:
        return dict(VAE_CONFIG, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    block_out_channels=[32, 64])
    raise ValueError(f"latent_factor = {latent_factor}: expected one of {LATENT_FACTORS}")


def unet_config(latent_factor: int = 4) -> dict[str, Any]:
    """The tiny UNet's config for ``latent_factor``; 4 is :data:`UNET_CONFIG`.

    Factor 2 puts one cheap 32-channel stage without attention at 32x32 in front of the factor-4 UNet, whose
    stages then run at the same 16x16 and 8x8 as before: about 1.3x the FLOPs, where the same UNet run at
    32x32 would cost 4x.
    """
    if latent_factor == 4:
        return dict(UNET_CONFIG)
    if latent_factor == 2:
        # the time embedding keeps the factor-4 width (4x its first stage's), so that every block of a
        # factor-4 base fits the inner stages (``tuner pretrain-tiny --init-from``)
        return dict(UNET_CONFIG, sample_size=32, block_out_channels=[32, *UNET_CONFIG["block_out_channels"]],
                    time_embedding_dim=4 * UNET_CONFIG["block_out_channels"][0],
                    down_block_types=["DownBlock2D", *UNET_CONFIG["down_block_types"]],
                    up_block_types=[*UNET_CONFIG["up_block_types"], "UpBlock2D"])
    raise ValueError(f"latent_factor = {latent_factor}: expected one of {LATENT_FACTORS}")


SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    # v-prediction on a zero-terminal-SNR schedule (Lin et al. 2024, "Common Diffusion Noise Schedules and
    # Sample Steps are Flawed"): with SD1's schedule the noisiest training step still leaks 6.8% of the
    # image, so an epsilon model never has to take the layout (the object's position) from the prompt and
    # samples place it wherever the starting noise suggests. Sampling starts at the last timestep (trailing).
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def scheduler_config(snr_shift: float = 1.0) -> dict[str, Any]:
    """The tiny scheduler's config with every timestep's signal-to-noise ratio divided by ``snr_shift``
    (1 is :data:`SCHEDULER_CONFIG`). The shifted schedule is stored as ``trained_betas``, which every
    diffusers scheduler reads; they already end at zero SNR, so ``rescale_betas_zero_snr`` leaves them as
    they are and only keeps the samplers' guard for the last step.

    Why: at a given SNR a picture with 4x the latent cells holds 4x the evidence of where its object is, so
    a UNet on 32x32 latents reads the layout off the noise almost to the noisiest step and never has to take
    it from the prompt (the first 32x32 tiny base: position 33%, chance). Dividing the SNR by the ratio of
    latent cells, ``(16 / side)^2``, gives every timestep the evidence it has on 16x16 latents (Hoogeboom et
    al. 2023, "simple diffusion"; Chen 2023, "On the importance of noise scheduling").
    """
    if snr_shift == 1.0:
        return dict(SCHEDULER_CONFIG)
    if not snr_shift > 0:
        raise ValueError(f"snr_shift = {snr_shift}: must be > 0")
    import torch
    from diffusers import DDPMScheduler

    ab = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.double()
    shifted = ab / (snr_shift - (snr_shift - 1) * ab)  # SNR / snr_shift, with SNR = ab / (1 - ab)
    before = torch.cat([torch.ones(1, dtype=torch.float64), shifted[:-1]])
    return dict(SCHEDULER_CONFIG, trained_betas=(1 - shifted / before).tolist())


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """CLIP BPE ``vocab.json`` and ``merges.txt`` contents for a word-level vocabulary.

    Each world word is built by left-to-right merges (``r e`` -> ``re``, ``re d</w>`` -> ``red</w>``). Words
    whose merges are pre-empted by another word's (``green`` contains ``re``) are moved to the front until
    every world word is exactly one token; other text splits into characters.
    """
    def word_merges(word: str) -> list[tuple[str, str]]:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        out, prefix = [], pieces[0]
        for piece in pieces[1:]:
            out.append((prefix, piece))
            prefix += piece
        return out

    order = list(WORLD_WORDS)
    for _ in range(len(order) ** 2):
        merges = list(dict.fromkeys(m for w in order for m in word_merges(w)))
        ranks = {m: i for i, m in enumerate(merges)}
        broken = [w for w in order if len(_bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)) != 1]
        if not broken:
            break
        order = [broken[0]] + [w for w in order if w != broken[0]]
    else:  # pragma: no cover - the word list is fixed; a test guards it
        raise RuntimeError(f"cannot make single-token merges for {broken}")
    tokens: list[str] = []
    for c in CHARS:
        tokens += [c, c + "</w>"]
    tokens += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for tok in tokens + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


def build_tokenizer():
    """A ``CLIPTokenizer`` over :data:`WORLD_WORDS` (written to a temp dir and loaded, as files would be)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (d / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": MAX_LENGTH, "bos_token": BOS, "eos_token": EOS,
                        "pad_token": EOS, "unk_token": EOS, "tokenizer_class": "CLIPTokenizer"}),
            encoding="utf-8",
        )
        tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    return tok


def text_encoder_config(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "projection_dim": 128,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """Randomly initialised tiny components (deterministic for ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    devnull_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        te_config = CLIPTextConfig(
            **text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        )
        text_encoder = CLIPTextModel(te_config)
    finally:
        torch.random.set_rng_state(devnull_state)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler_config": dict(SCHEDULER_CONFIG),
    }
