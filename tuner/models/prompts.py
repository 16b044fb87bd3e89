"""Prompt encoding, shared by training and the sampler.

:func:`encode_conditioning` follows the base's family record (``family.text_encoders``): each encoder's
chosen hidden states (``last``: SD1/SD2/tiny; ``penultimate``, before the final norm: both SDXL encoders)
for prompts padded to its tokenizer's ``model_max_length`` L (77 for SD, 32 for tiny), concatenated along
the width (SDXL: 768 + 1280), plus the pooled projection of the encoder marked ``pooled`` (SDXL's second).
:func:`unet_kwargs` adds the family's extra UNet inputs (SDXL's size/crop ``time_ids``). Same as diffusers'
``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` (no attention mask), so images match them.

Multi-vector textual-inversion tokens (``T`` registered together with ``T_1 .. T_{n-1}``, see
:mod:`tuner.adapters.embedding`) are expanded here, the one place prompts are tokenized: a prompt that says
``T`` means all ``n`` vectors, as in diffusers and A1111.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class Conditioning:
    """What a batch of prompts gives the UNet: ``embeds`` ``[B, L, D]`` (every encoder's hidden states,
    concatenated on D) and, for families with a pooled encoder, ``pooled`` ``[B, P]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        return Conditioning(self.embeds.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def row(self, i: int) -> Conditioning:
        return Conditioning(self.embeds[i : i + 1], None if self.pooled is None else self.pooled[i : i + 1])

    def zeros_like(self) -> Conditioning:
        return Conditioning(torch.zeros_like(self.embeds), None if self.pooled is None else torch.zeros_like(self.pooled))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        pooled = [p.pooled for p in parts]
        return Conditioning(
            torch.cat([p.embeds for p in parts]),
            None if any(x is None for x in pooled) else torch.cat(pooled),  # type: ignore[arg-type]
        )


def encode_conditioning(base: Any, prompts: Sequence[str]) -> Conditioning:
    """Prompt conditioning for ``base`` (a :class:`~tuner.models.base.BaseModel`), on its first text
    encoder's device and dtype, as its family record says (module docstring). Gradients flow if enabled."""
    hidden: list[torch.Tensor] = []
    pooled = None
    device = None
    for spec in base.family.text_encoders:
        encoder, tokenizer = getattr(base, spec.component), getattr(base, spec.tokenizer)
        device = device or next(encoder.parameters()).device
        ids = tokenize(tokenizer, prompts).to(next(encoder.parameters()).device)
        penultimate = spec.hidden_layer == "penultimate"
        out = encoder(ids, output_hidden_states=penultimate)
        hidden.append((out.hidden_states[-2] if penultimate else out.last_hidden_state).to(device))
        if spec.pooled:
            pooled = out.text_embeds.to(device)
    return Conditioning(torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0], pooled)


def unet_kwargs(
    family: Any,
    cond: Conditioning,
    *,
    target_size: tuple[int, int],
    original_sizes: Sequence[tuple[int, int]] | None = None,
    crops: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of the UNet's forward besides the noisy latents and the timesteps.

    For a family with ``added_conditioning`` (SDXL) this adds ``added_cond_kwargs``: the pooled embedding
    and one row of ``time_ids`` per sample, the family's parts in order (``original_size``,
    ``crops_coords_top_left``, ``target_size``; sizes as (height, width), crops as (top, left)). Without
    per-sample values the original size is the target size and the crop is (0, 0), as in diffusers'
    pipeline.
    """
    kwargs: dict[str, Any] = {"encoder_hidden_states": cond.embeds}
    if not family.added_conditioning:
        return kwargs
    if cond.pooled is None:
        raise ValueError(f"family {family.name} needs a pooled text embedding, and the conditioning has none")
    n = len(cond)
    values = {
        "original_size": list(original_sizes) if original_sizes is not None else [target_size] * n,
        "crops_coords_top_left": list(crops) if crops is not None else [(0, 0)] * n,
        "target_size": [target_size] * n,
    }
    rows = [[float(v) for part in family.added_conditioning for v in values[part][i]] for i in range(n)]
    time_ids = torch.tensor(rows, dtype=cond.embeds.dtype, device=cond.embeds.device)
    kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids}
    return kwargs
