"""Training methods as small records (STYLE.md #1): what is trainable and what is saved.

Every method runs through the same loop (``tuner.train.loop``). Adding DreamBooth or textual inversion
means adding a record here, not a second training script.
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


@dataclass(frozen=True)
class Method:
    """``attach`` makes the chosen parts trainable and returns component -> module for each trained
    component. ``network_args`` describes the adapter for the file metadata (kohya ``ss_network_args``)."""

    name: str
    attach: Callable[[Any, AdapterSettings], dict[str, nn.Module]]
    network_args: Callable[[AdapterSettings], dict[str, str]]


def _attach_lora(base: Any, s: AdapterSettings) -> dict[str, nn.Module]:
    for module in (base.unet, base.vae, base.text_encoder):
        module.requires_grad_(False)
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
    if s.train_text_encoder:
        te_rank = s.text_encoder_rank or s.rank
        te_alpha = s.text_encoder_alpha or s.alpha
        te_plan = plan_ranks(base.text_encoder, text_encoder_targets(base.text_encoder), rank=te_rank, alpha=te_alpha)
        attach_lora(base.text_encoder, te_plan, dropout=s.dropout)
        trained["text_encoder"] = base.text_encoder
    return trained


def _lora_network_args(s: AdapterSettings) -> dict[str, str]:
    args = {"targets": s.targets}
    if s.targets == "locon":
        args.update(conv_dim=str(s.conv_rank), conv_alpha=str(s.conv_alpha))
    if s.dropout:
        args["dropout"] = str(s.dropout)
    return args


METHODS: dict[str, Method] = {
    "lora": Method(name="lora", attach=_attach_lora, network_args=_lora_network_args),
}
