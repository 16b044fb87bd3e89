"""Prompt encoding, shared by training and the sampler.

Output convention (SD1 family): ``[B, L, D]`` last hidden states of the text encoder for prompts padded to
the tokenizer's ``model_max_length`` L (77 for SD1, 32 for tiny), D = the encoder width. Same as
diffusers' ``StableDiffusionPipeline`` (no attention mask, last layer), so images match it.

Multi-vector textual-inversion tokens (``T`` registered together with ``T_1 .. T_{n-1}``, see
:mod:`tuner.adapters.embedding`) are expanded here, the one place prompts are tokenized: a prompt that says
``T`` means all ``n`` vectors, as in diffusers and A1111.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from tuner.adapters.embedding import token_names


def multi_vector_tokens(tokenizer: Any) -> dict[str, int]:
    """``{T: n}`` for every added token ``T`` registered with ``T_1`` (n >= 2 vectors). Cheap: it scans
    only the tokenizer's added tokens (a handful of special tokens when no embedding is registered)."""
    added = tokenizer.get_added_vocab()
    found: dict[str, int] = {}
    for token in added:
        if f"{token}_1" in added:
            n = 2
            while f"{token}_{n}" in added:
                n += 1
            found[token] = n
    return found


def expand_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """``prompts`` with every occurrence of a multi-vector token ``T`` that is delimited by whitespace,
    punctuation or the ends of the text replaced by ``T T_1 ... T_{n-1}``. Occurrences inside a longer word
    (``xT``, ``T_1``) and single-vector tokens are left alone. The match ignores case when the tokenizer
    does (CLIP lower-cases, so ``<PINK>`` is ``<pink>``)."""
    tokens = multi_vector_tokens(tokenizer)
    if not tokens:
        return list(prompts)
    out = list(prompts)
    for token in sorted(tokens, key=len, reverse=True):
        flags = re.IGNORECASE if _case_insensitive(tokenizer, token) else 0
        pattern = re.compile(r"(?<!\w)" + re.escape(token) + r"(?!\w)", flags)
        replacement = " ".join(token_names(token, tokens[token])).replace("\\", "\\\\")  # literal text
        out = [pattern.sub(replacement, text) for text in out]
    return out


def _case_insensitive(tokenizer: Any, token: str) -> bool:
    other = token.swapcase()
    if other == token:
        return False
    ids = tokenizer([token, other], add_special_tokens=False).input_ids
    return len(ids[0]) == 1 and ids[0] == ids[1]


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[B, L]`` (int64), padded/truncated to the tokenizer's max length, after
    :func:`expand_prompts` (a no-op unless multi-vector embeddings are registered)."""
    return tokenizer(
        expand_prompts(tokenizer, prompts),
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
