"""One record per model family. Family differences live here and nowhere else (STYLE.md #6).

Adding a family means adding a record, not ``if family == ...`` branches elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.errors import TunerError


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family.

    ``component``: attribute/folder name (``text_encoder``, ``text_encoder_2``).
    ``kohya_prefix``: prefix of its module names in kohya files (``lora_te``, ``lora_te1``, ``lora_te2``).
    ``hidden_size``: width of its embeddings (used to tell families apart in files).
    """

    component: str
    kohya_prefix: str
    hidden_size: int


@dataclass(frozen=True)
class Family:
    """What differs between base model families.

    ``unet_naming``: how kohya names UNet modules for this family: ``"diffusers"`` (SD1/SD2: names from the
    diffusers module tree) or ``"ldm"`` (SDXL: names from the original CompVis/sgm tree).
    ``ss_base_model_version`` / ``modelspec_architecture``: metadata strings other tools read (FORMATS.md §2).
    ``resolution``: native training/sampling resolution in pixels.
    """

    name: str
    description: str
    resolution: int
    text_encoders: tuple[TextEncoderSpec, ...]
    unet_naming: str
    ss_base_model_version: str
    ss_v2: bool
    modelspec_architecture: str
    modelspec_implementation: str
    cross_attention_dim: int

    @property
    def kohya_prefixes(self) -> dict[str, str]:
        """component -> kohya prefix, including ``unet -> lora_unet``."""
        table = {"unet": "lora_unet"}
        table.update({te.component: te.kohya_prefix for te in self.text_encoders})
        return table


SD15 = Family(
    name="sd15",
    description="Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, 4-channel latents, 512 px)",
    resolution=512,
    text_encoders=(TextEncoderSpec("text_encoder", "lora_te", 768),),
    unet_naming="diffusers",
    ss_base_model_version="sd_v1",
    ss_v2=False,
    modelspec_architecture="stable-diffusion-v1",
    modelspec_implementation="diffusers",
    cross_attention_dim=768,
)

# The embedded base is SD1-shaped (same component layout and key naming rules), only smaller; its
# metadata says sd_v1 so that tools which only know SD1/SD2/SDXL file it under SD1.
TINY = Family(
    name="tiny",
    description="tuner's embedded tiny SD1-style base (64 px, 4x VAE, 128-wide text encoder)",
    resolution=64,
    text_encoders=(TextEncoderSpec("text_encoder", "lora_te", 128),),
    unet_naming="diffusers",
    ss_base_model_version="sd_v1",
    ss_v2=False,
    modelspec_architecture="stable-diffusion-v1",
    modelspec_implementation="diffusers",
    cross_attention_dim=128,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, TINY)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise TunerError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
