"""The in-memory adapter representation every format converts to and from.

Keys of :attr:`LoraWeights.modules` are *canonical module keys*: ``"<component>:<module path>"`` where
component is ``unet``, ``text_encoder`` or ``text_encoder_2`` and the module path is the dotted path of the
adapted ``Linear``/``Conv2d`` in the diffusers UNet tree or the Hugging Face CLIP tree **with** the
``text_model.`` level (``text_encoder:text_model.encoder.layers.0.self_attn.q_proj``), whatever the
installed transformers version reports. Formats map these keys to file key names; the model side maps them
to live modules (see ``tuner.adapters.lora.resolve_module``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """Low-rank factors of one adapted layer.

    ``down``: ``[r, in]`` (Linear) or ``[r, in, kh, kw]`` (Conv2d); ``up``: ``[out, r]`` or
    ``[out, r, 1, 1]``. The weight delta is ``(alpha / r) * up @ down`` (flattened for convs).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, weight_shape: torch.Size | tuple[int, ...], multiplier: float = 1.0) -> torch.Tensor:
        """``multiplier * alpha / r * up @ down`` in fp32, reshaped to the base weight's shape."""
        up = self.up.float().flatten(1)
        down = self.down.float().flatten(1)
        return (multiplier * self.scale) * (up @ down).reshape(weight_shape)


@dataclass
class LoraWeights:
    """A whole LoRA/LoCon adapter: canonical module key -> factors, plus file metadata (all strings)."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> set[str]:
        return {key.split(":", 1)[0] for key in self.modules}


def split_key(key: str) -> tuple[str, str]:
    """``"unet:down_blocks.0..."`` -> ``("unet", "down_blocks.0...")``."""
    component, _, path = key.partition(":")
    if component not in COMPONENTS or not path:
        raise ValueError(f"not a canonical module key: {key!r}")
    return component, path
