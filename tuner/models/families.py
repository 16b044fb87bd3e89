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
    ``hidden_layer``: which hidden states the UNet sees: ``"last"`` (the final layer, after the final layer
    norm: SD1, and SD2 whose diffusers encoder already stops one layer early) or ``"penultimate"``
    (``hidden_states[-2]``, no final norm: both SDXL encoders).
    ``pooled``: whether its pooled, projected output (``text_embeds``) conditions the UNet (SDXL's second).
    ``model_class``: the transformers class of the diffusers component.
    ``tokenizer``: the component name of its tokenizer.
    ``ldm_prefix`` / ``ldm_format``: where its weights sit in an original (LDM) single-file checkpoint and in
    which layout: ``"clip"`` (HF CLIP names under the prefix) or ``"openclip"`` (OpenCLIP ``resblocks``
    with fused q/k/v).
    ``embedding_key``: the key of its vectors in a textual-inversion file (FORMATS.md §4): ``text_encoder``
    for one-encoder families (written as kohya's ``emb_params``), ``clip_l`` / ``clip_g`` for SDXL's two.
    """

    component: str
    kohya_prefix: str
    hidden_size: int
    hidden_layer: str = "last"
    pooled: bool = False
    model_class: str = "CLIPTextModel"
    tokenizer: str = "tokenizer"
    ldm_prefix: str = "cond_stage_model.transformer."
    ldm_format: str = "clip"
    embedding_key: str = "text_encoder"


@dataclass(frozen=True)
class Family:
    """What differs between base model families.

    ``unet_naming``: how kohya names UNet modules for this family: ``"diffusers"`` (SD1/SD2: names from the
    diffusers module tree) or ``"ldm"`` (SDXL: names from the original CompVis/sgm tree).
    ``ss_base_model_version`` / ``modelspec_architecture``: metadata strings other tools read (FORMATS.md §2).
    ``resolution``: native training/sampling resolution in pixels.
    ``prediction_type``: the UNet's target in diffusers' words (``"epsilon"``, ``"v_prediction"``).
    ``latent_scale``: the VAE ``scaling_factor`` (latents the UNet sees = VAE sample x this); None for tiny,
    whose pretrained VAE carries its own in its config.
    ``added_conditioning``: extra UNet inputs beside the prompt embeds (SDXL's ``time_ids`` parts, in order).
    ``configs``: folder under ``tuner/models/configs`` with the component configs that loading a single-file
    checkpoint of this family needs (None: no single files exist for it).
    ``ldm_layers_dropped``: final LDM text-encoder layers a diffusers encoder leaves out (SD2: its OpenCLIP
    has 24 layers and diffusers keeps 23, which is how SD2 uses the penultimate layer).
    ``pipeline_class``: the diffusers pipeline that loads and saves a folder of this family.
    ``zero_empty_negative``: an empty negative prompt means all-zero prompt embeds (SDXL base was trained
    with zeroed embeds for dropped captions; diffusers' SDXL pipeline does this by default).
    ``bucket_step``: pixel step of aspect-ratio bucket sides when ``data.bucket_step = 0``: kohya's 64 for the
    SD families, smaller for a base whose native size is small.
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
    prediction_type: str = "epsilon"
    latent_scale: float | None = 0.18215
    added_conditioning: tuple[str, ...] = ()
    configs: str | None = None
    ldm_layers_dropped: int = 0
    pipeline_class: str = "StableDiffusionPipeline"
    zero_empty_negative: bool = False
    bucket_step: int = 64

    @property
    def kohya_prefixes(self) -> dict[str, str]:
        """component -> kohya prefix, including ``unet -> lora_unet``."""
        table = {"unet": "lora_unet"}
        table.update({te.component: te.kohya_prefix for te in self.text_encoders})
        return table

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """The vector keys of this family's textual-inversion files, in encoder order (``text_encoder``;
        SDXL: ``clip_l``, ``clip_g``)."""
        return tuple(te.embedding_key for te in self.text_encoders)


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
    configs="sd15",
)

# SD2.x: OpenCLIP ViT-H/14 text encoder. The 512 base predicts noise; the 768 model predicts v. Their weights
# have the same keys and shapes, so the two are separate records and a single file must say which it is.
_OPENCLIP_H = (TextEncoderSpec("text_encoder", "lora_te", 1024, ldm_prefix="cond_stage_model.model.",
                               ldm_format="openclip"),)

SD2 = Family(
    name="sd2",
    description="Stable Diffusion 2.x base (OpenCLIP ViT-H/14 text encoder, epsilon prediction, 512 px)",
    resolution=512,
    text_encoders=_OPENCLIP_H,
    unet_naming="diffusers",
    ss_base_model_version="sd_v2",
    ss_v2=True,
    modelspec_architecture="stable-diffusion-v2-512",
    modelspec_implementation="diffusers",
    cross_attention_dim=1024,
    configs="sd2",
    ldm_layers_dropped=1,
)

SD2V = Family(
    name="sd2v",
    description="Stable Diffusion 2.x 768-v (OpenCLIP ViT-H/14 text encoder, v-prediction, 768 px)",
    resolution=768,
    text_encoders=_OPENCLIP_H,
    unet_naming="diffusers",
    ss_base_model_version="sd_v2_v",
    ss_v2=True,
    modelspec_architecture="stable-diffusion-v2-768-v",
    modelspec_implementation="diffusers",
    cross_attention_dim=1024,
    prediction_type="v_prediction",
    configs="sd2v",
    ldm_layers_dropped=1,
)

# SDXL base: CLIP ViT-L (te1) and OpenCLIP ViT-bigG (te2), both read at the penultimate layer and
# concatenated to 2048 wide; te2's pooled projection and the size/crop time ids go in through add_embedding.
SDXL = Family(
    name="sdxl",
    description="Stable Diffusion XL base 1.0 (CLIP ViT-L + OpenCLIP ViT-bigG text encoders, 1024 px)",
    resolution=1024,
    text_encoders=(
        TextEncoderSpec("text_encoder", "lora_te1", 768, hidden_layer="penultimate",
                        ldm_prefix="conditioner.embedders.0.transformer.", embedding_key="clip_l"),
        TextEncoderSpec(
            "text_encoder_2", "lora_te2", 1280, hidden_layer="penultimate", pooled=True,
            model_class="CLIPTextModelWithProjection", tokenizer="tokenizer_2",
            ldm_prefix="conditioner.embedders.1.model.", ldm_format="openclip", embedding_key="clip_g",
        ),
    ),
    unet_naming="ldm",
    ss_base_model_version="sdxl_base_v1-0",
    ss_v2=False,
    modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    cross_attention_dim=2048,
    latent_scale=0.13025,
    added_conditioning=("original_size", "crops_coords_top_left", "target_size"),
    configs="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    zero_empty_negative=True,
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
    prediction_type="v_prediction",
    latent_scale=None,
    # 4x VAE x 2 UNet downsamplings: the smallest step whose latents every UNet level divides evenly (64 px at
    # a 64 px base would leave 3 buckets: 1:4, 1:1, 4:1).
    bucket_step=16,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SD2, SD2V, SDXL, TINY)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise TunerError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
