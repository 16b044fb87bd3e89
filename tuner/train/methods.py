"""Training methods as small records (STYLE.md #1): what is trainable and what is saved.

Every method runs through the same loop (``tuner.train.loop``); a method is a record here, not a second
training script. Prior preservation (DreamBooth) is not a method: any method that changes weights can pair
its instance images with class images (``[prior]``), which is how DreamBooth-LoRA is ``lora`` + prior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tuner.adapters.lora import attach_lora, plan_ranks, text_encoder_targets, unet_targets
from tuner.errors import TunerError


@dataclass(frozen=True)
class AdapterSettings:
    """Plain adapter arguments (no recipe types past the builders)."""

    targets: str
    rank: int
    alpha: float
    conv_rank: int
    conv_alpha: float
    dropout: float
    train_text_encoder: bool
    text_encoder_rank: int
    text_encoder_alpha: float
    tokens: tuple[str, ...] = ()
    init_words: tuple[str, ...] = ()
    vectors: int = 1


@dataclass(frozen=True)
class Method:
    """``attach`` makes the chosen parts trainable and returns component -> module for each trained
    component (``unet``, ``text_encoder``, or ``embedding`` / ``embedding_2`` for new token vectors in
    each text encoder, which get their own learning rate). ``network_args`` describes the adapter for the file metadata (kohya
    ``ss_network_args``). ``saves``: the artifacts the export writes, in order: ``lora`` (kohya file, plus
    PEFT on request), ``embedding`` (one file per token, kohya and diffusers layouts), ``model`` (the full
    fine-tuned base as a diffusers folder, plus a LoRA extracted from its difference to the base)."""

    name: str
    attach: Callable[[Any, AdapterSettings], dict[str, nn.Module]]
    network_args: Callable[[AdapterSettings], dict[str, str]]
    saves: tuple[str, ...]


def _freeze(base: Any) -> None:
    for module in base.components.values():
        module.requires_grad_(False)


def _attach_lora(base: Any, s: AdapterSettings) -> dict[str, nn.Module]:
    _freeze(base)
    conv = s.targets == "locon"
    targets = unet_targets(base.unet, s.targets)
    if not targets:
        raise TunerError(f"target preset '{s.targets}' selects no module of this UNet")
    plan = plan_ranks(
        base.unet,
        targets,
        rank=s.rank,
        alpha=s.alpha,
        conv_rank=s.conv_rank if conv else None,
        conv_alpha=s.conv_alpha if conv else None,
    )
    attach_lora(base.unet, plan, dropout=s.dropout)
    trained = {"unet": base.unet}
    if s.train_text_encoder:  # every text encoder of the family (SDXL: both, as kohya does)
        te_rank = s.text_encoder_rank or s.rank
        te_alpha = s.text_encoder_alpha or s.alpha
        for component, encoder in base.text_encoders.items():
            te_plan = plan_ranks(encoder, text_encoder_targets(encoder), rank=te_rank, alpha=te_alpha)
            attach_lora(encoder, te_plan, dropout=s.dropout)
            trained[component] = encoder
    return trained


def _lora_network_args(s: AdapterSettings) -> dict[str, str]:
    args = {"targets": s.targets}
    if s.targets == "locon":
        args.update(conv_dim=str(s.conv_rank), conv_alpha=str(s.conv_alpha))
    if s.dropout:
        args["dropout"] = str(s.dropout)
    return args


def _attach_full(base: Any, s: AdapterSettings) -> dict[str, nn.Module]:
    """DreamBooth: every UNet weight trains (and every text-encoder weight with train_text_encoder)."""
    _freeze(base)
    base.unet.requires_grad_(True)
    trained = {"unet": base.unet}
    if s.train_text_encoder:
        for component, encoder in base.text_encoders.items():
            encoder.requires_grad_(True)
            trained[component] = encoder
    return trained


def _attach_embeddings(base: Any, s: AdapterSettings, *, freeze: bool = True) -> dict[str, nn.Module]:
    """Textual inversion: new tokens whose vectors alone train; every existing row stays as it was. Each
    text encoder of the family gets the tokens (SDXL: both, initialised from the same word in each table),
    trained as ``embedding`` / ``embedding_2``."""
    from tuner.adapters.embedding import install_placeholders, placeholder_component

    if not s.tokens:
        raise TunerError("textual inversion needs at least one token (embedding.tokens)")
    if freeze:
        _freeze(base)
    trained: dict[str, nn.Module] = {}
    for spec in base.family.text_encoders:
        tokenizer, encoder = getattr(base, spec.tokenizer), getattr(base, spec.component)
        for token, word in zip(s.tokens, s.init_words, strict=True):  # one module per encoder holds them all
            module = install_placeholders(tokenizer, encoder, token, s.vectors, word)
        trained[placeholder_component(spec.component)] = module
    return trained


def _attach_pivotal(base: Any, s: AdapterSettings) -> dict[str, nn.Module]:
    """Pivotal tuning: the new token vectors and a LoRA, trained together."""
    trained = _attach_lora(base, s)  # first: it freezes the whole base, placeholder rows included
    trained.update(_attach_embeddings(base, s, freeze=False))
    return trained


def _full_network_args(s: AdapterSettings) -> dict[str, str]:
    return {"extracted_from": "dreambooth", "train_text_encoder": str(s.train_text_encoder)}


def _embedding_network_args(s: AdapterSettings) -> dict[str, str]:
    return {"tokens": " ".join(s.tokens), "vectors": str(s.vectors)}


def _pivotal_network_args(s: AdapterSettings) -> dict[str, str]:
    return {**_lora_network_args(s), **_embedding_network_args(s)}


METHODS: dict[str, Method] = {
    "lora": Method("lora", _attach_lora, _lora_network_args, saves=("lora",)),
    "dreambooth": Method("dreambooth", _attach_full, _full_network_args, saves=("model",)),
    "textual_inversion": Method("textual_inversion", _attach_embeddings, _embedding_network_args, saves=("embedding",)),
    "pivotal": Method("pivotal", _attach_pivotal, _pivotal_network_args, saves=("lora", "embedding")),
}
