"""The training dataset: examples that can be rebuilt exactly from (seed, epoch, sample index).

Tensor conventions: ``Example.pixel_values`` is float32 ``[3, R, R]`` in ``[-1, 1]`` (RGB, channels
first, ``R`` = resolution); ``Batch.pixel_values`` is ``[B, 3, R, R]``, same range.

Exact resume without saved RNG state: every random choice of sample ``i`` in ``epoch`` (crop offsets,
flip, caption dropout, tag order) comes from generators seeded by :func:`example_seed` of
``(seed, epoch, i, stream)``, one stream for the image and one for the caption, so that turning flips on
does not change which captions are dropped. The order in which samples are visited is
:meth:`TrainDataset.epoch_order`, also a pure function of (seed, epoch). The training loop draws batches
from that order itself (no DataLoader shuffling); resuming at step ``s`` just skips ahead.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from tuner.data.captions import process_caption
from tuner.data.folder import DatasetIndex
from tuner.data.images import load_image, prepare_image, resize_short_side

# Stream tags keep the generators of one sample (and the epoch order) independent of each other.
IMAGE_STREAM = 0
CAPTION_STREAM = 1
ORDER_STREAM = 2

FLIP_PROBABILITY = 0.5


def example_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 63-bit seed hashed (BLAKE2b) from four signed 64-bit integers; stable across runs and machines."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, epoch, index, stream), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_generator(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`example_seed`."""
    return torch.Generator().manual_seed(example_seed(seed, epoch, index, stream))


@dataclass
class Example:
    """One training example (sample ``i`` of an epoch)."""

    pixel_values: torch.Tensor
    """float32 ``[3, R, R]`` in ``[-1, 1]``."""
    caption: str
    """The caption after dropout / tag shuffling (``""`` when dropped)."""
    item_index: int
    """Index into ``DatasetIndex.items`` (the image this example was made from)."""
    flipped: bool
    """Whether the pixels were mirrored left-right."""


@dataclass
class Batch:
    """A batch of examples, as the training loop consumes it."""

    pixel_values: torch.Tensor
    """float32 ``[B, 3, R, R]`` in ``[-1, 1]``."""
    captions: list[str]
    item_indices: list[int]
    flipped: list[bool]

    def __len__(self) -> int:
        return len(self.captions)


def collate(examples: Sequence[Example]) -> Batch:
    """Stack examples (all of one resolution) into a :class:`Batch`, keeping their order."""
    if not examples:
        raise ValueError("collate needs at least one example")
    return Batch(
        pixel_values=torch.stack([e.pixel_values for e in examples]),
        captions=[e.caption for e in examples],
        item_indices=[e.item_index for e in examples],
        flipped=[e.flipped for e in examples],
    )


class TrainDataset(Dataset[Example]):
    """Square training examples over a :class:`DatasetIndex`, each image repeated ``item.repeats`` times.

    Sample ``i`` belongs to item ``item_of(i)``; samples are laid out item by item (item 0's repeats
    first), and :meth:`epoch_order` shuffles them. Decoded images are kept in memory, already resized
    so their short side is ``resolution`` (the deterministic part); only crop, flip and caption edits
    are redone per example. ``center_crop=False`` crops at random; ``flip=True`` mirrors with p = 0.5.
    Transparent pixels are composited over ``background`` (RGB).
    """

    def __init__(
        self,
        index: DatasetIndex,
        *,
        resolution: int,
        center_crop: bool = True,
        flip: bool = False,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        seed: int = 0,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if keep_tags < 0:
            raise ValueError(f"keep_tags must be >= 0, got {keep_tags}")
        if not index.items:
            raise ValueError("the dataset index has no items")
        self.index = index
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip = flip
        self.caption_dropout = caption_dropout
        self.shuffle_tags = shuffle_tags
        self.keep_tags = keep_tags
        self.seed = seed
        self.background = background
        self.epoch = 0
        self._item_of = [k for k, item in enumerate(index.items) for _ in range(item.repeats)]
        self._images: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self._item_of)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose examples ``dataset[i]`` returns."""
        self.epoch = epoch

    def item_of(self, i: int) -> int:
        """The item (index into ``index.items``) that sample ``i`` shows."""
        return self._item_of[i]

    def __getitem__(self, i: int) -> Example:
        return self.get(i, self.epoch)

    def get(self, i: int, epoch: int) -> Example:
        """Sample ``i`` of ``epoch``; the same arguments always give the same example."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range for a dataset of {len(self)} samples")
        item_index = self._item_of[i]
        image_rng = make_generator(self.seed, epoch, i, IMAGE_STREAM)
        # Draw order: the flip decision (only when flips are on), then crop offsets (random crop only).
        flipped = self.flip and float(torch.rand((), generator=image_rng)) < FLIP_PROBABILITY
        pixels = prepare_image(
            self._image(item_index),
            self.resolution,
            crop="center" if self.center_crop else "random",
            flip=flipped,
            generator=image_rng,
        )
        caption = process_caption(
            self.index.items[item_index].caption,
            dropout=self.caption_dropout,
            shuffle_tags=self.shuffle_tags,
            keep_tags=self.keep_tags,
            generator=make_generator(self.seed, epoch, i, CAPTION_STREAM),
        )
        return Example(pixel_values=pixels, caption=caption, item_index=item_index, flipped=flipped)

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which the samples of ``epoch`` are visited: a permutation of ``range(len(self))``."""
        generator = make_generator(self.seed, epoch, -1, ORDER_STREAM)
        return torch.randperm(len(self), generator=generator).tolist()

    def deterministic_example(self, item_index: int, flipped: bool) -> torch.Tensor:
        """Centre-crop pixels of an item (mirrored if ``flipped``), for pre-computing cached latents.

        Equal to ``get(i, epoch).pixel_values`` for every sample of that item with the same flip when
        ``center_crop`` is on. float32 ``[3, R, R]`` in ``[-1, 1]``.
        """
        return prepare_image(self._image(item_index), self.resolution, crop="center", flip=flipped)

    def _image(self, item_index: int) -> Image.Image:
        image = self._images.get(item_index)
        if image is None:
            path = self.index.items[item_index].path
            image = resize_short_side(load_image(path, self.background), self.resolution)
            self._images[item_index] = image
        return image
