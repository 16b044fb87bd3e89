"""Prompt encoding, shared by training and the sampler.

Output convention (SD1 family): ``[B, L, D]`` last hidden states of the text encoder for prompts padded to
the tokenizer's ``model_max_length`` L (77 for SD1, 32 for tiny), D = the encoder width. Same as
diffusers' ``StableDiffusionPipeline`` (no attention mask, last layer), so images match it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[B, L]`` (int64), padded/truncated to the tokenizer's max length."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeds ``[B, L, D]`` on the text encoder's device and dtype. Gradients flow if enabled."""
    device = next(text_encoder.parameters()).device
    ids = tokenize(tokenizer, prompts).to(device)
    return text_encoder(ids)[0]
