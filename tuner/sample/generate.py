"""``tuner sample``: a base plus any number of LoRA files, merged (default) or as live layers, and any
number of textual-inversion embedding files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuner.adapters.embedding import add_embedding_to_base, check_embedding_family
from tuner.adapters.lora import attach_lora_file, candidate_keys, check_shapes, merge_lora
from tuner.adapters.types import LoraWeights
from tuner.errors import TunerError
from tuner.formats.embeddings import EmbeddingData, file_short_hash, read_embedding
from tuner.formats.kohya import kohya_name_table
from tuner.formats.lorafile import load_lora
from tuner.models.base import BaseModel
from tuner.models.families import Family
from tuner.sample.png import infotext, save_png
from tuner.sample.sampler import SampleSettings, grid, sample_images


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:SCALE`` (the part after the last ``:`` is a scale only if it is a number)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text), 1.0)


@dataclass
class LoadedLora:
    spec: LoraSpec
    weights: LoraWeights
    name: str
    short_hash: str


def load_loras_for(base: BaseModel, specs: Sequence[LoraSpec], *, lenient: bool = False) -> list[LoadedLora]:
    """Read each file (kohya, diffusers/PEFT), check it fits ``base``; never touches the model."""
    models = {"unet": base.unet, **base.text_encoders}
    table = kohya_name_table(base.family, candidate_keys(models))
    loaded = []
    for spec in specs:
        if not spec.path.is_file():
            raise TunerError(f"LoRA file '{spec.path}' does not exist")
        weights = load_lora(spec.path, name_table=table, lenient=lenient, family=base.family)
        check_shapes(models, weights, base.family.name)
        digest = weights.metadata.get("sshs_model_hash", "")
        loaded.append(LoadedLora(spec, weights, weights.metadata.get("ss_output_name") or spec.path.stem, digest[:12]))
    return loaded


def apply_loras(base: BaseModel, loras: Sequence[LoadedLora], *, merge: bool = True) -> None:
    """Merge each LoRA into the weights (scale included) or attach it as live layers."""
    models = {"unet": base.unet, **base.text_encoders}
    for i, lora in enumerate(loras):
        if merge:
            merge_lora(models, lora.weights, lora.spec.scale)
        else:
            attach_lora_file(models, lora.weights, adapter_name=f"lora{i}", multiplier=lora.spec.scale)


@dataclass(frozen=True)
class EmbeddingSpec:
    path: Path
    token: str | None = None

    @classmethod
    def parse(cls, text: str) -> EmbeddingSpec:
        """``FILE`` or ``FILE:TOKEN`` (a text naming an existing file is always just ``FILE``)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and tail and not Path(text).exists() and "/" not in tail and "\\" not in tail:
            return cls(Path(head), tail)
        return cls(Path(text))


@dataclass
class LoadedEmbedding:
    spec: EmbeddingSpec
    data: EmbeddingData
    short_hash: str

    @property
    def token(self) -> str:
        return self.data.token


def read_embeddings(specs: Sequence[EmbeddingSpec], family: Family | None = None) -> list[LoadedEmbedding]:
    """Read every embedding file (before the slow base load, so a bad file fails fast); TOKEN overrides
    the file's token. Two files registering the same token are a :class:`TunerError`, and so is, when the
    base's ``family`` is given, a file for another kind of base (an SDXL file on SD1 or the reverse)."""
    loaded: list[LoadedEmbedding] = []
    for spec in specs:
        data = read_embedding(spec.path, spec.token)
        if family is not None:
            check_embedding_family(family, data.vectors, source=str(spec.path))
        if any(other.token == data.token for other in loaded):
            raise TunerError(f"{spec.path}: token '{data.token}' is already used by another --embedding; "
                             "give one of them another token with FILE:TOKEN")
        loaded.append(LoadedEmbedding(spec, data, file_short_hash(spec.path)))
    return loaded


def apply_embeddings(base: BaseModel, embeddings: Sequence[LoadedEmbedding]) -> None:
    """Register each embedding's token(s) in every tokenizer of the base and write its vectors into each
    text encoder (SDXL: ``clip_l`` into ``text_encoder``, ``clip_g`` into ``text_encoder_2``;
    :func:`~tuner.adapters.embedding.add_embedding_to_base`, where family, width and clashes are checked)."""
    for emb in embeddings:
        add_embedding_to_base(base, emb.token, emb.data.vectors, source=str(emb.spec.path))


def generate(
    base: BaseModel,
    loras: Sequence[LoadedLora],
    *,
    prompt: str,
    count: int,
    seed: int,
    settings: SampleSettings,
    out_dir: Path,
    stem: str = "sample",
    embeddings: Sequence[LoadedEmbedding] = (),
) -> list[Path]:
    """Write ``count`` PNGs (seeds ``seed .. seed+count-1``) with A1111 ``parameters`` chunks, plus a grid
    when ``count > 1``. Returns the paths. Embeddings whose token the prompt or negative prompt uses are
    listed as A1111 does, ``TI hashes: "token: <first 12 hex of the file's SHA-256>"``."""
    seeds = [seed + i for i in range(count)]
    images = sample_images(base, [prompt] * count, seeds, settings)
    width = settings.width or base.family.resolution
    height = settings.height or base.family.resolution
    lora_info = [(lo.name, lo.spec.scale, lo.short_hash) for lo in loras]
    said = f"{prompt} {settings.negative}".lower()
    used = [f"{e.token}: {e.short_hash}" for e in embeddings if e.token.lower() in said]
    extra = {"TI hashes": '"' + ", ".join(used) + '"'} if used else None
    paths = []
    for s, image in zip(seeds, images):
        text = infotext(
            prompt=prompt, negative=settings.negative, steps=settings.steps, sampler=settings.sampler,
            cfg=settings.cfg, seed=s, width=width, height=height, loras=lora_info, extra=extra,
        )
        paths.append(save_png(image, out_dir / f"{stem}_{s}.png", parameters=text))
    if count > 1:
        paths.append(save_png(grid(images), out_dir / f"{stem}_grid.png"))
    return paths
