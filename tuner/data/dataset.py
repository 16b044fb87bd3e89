"""The training dataset: examples that can be rebuilt exactly from (seed, epoch, sample index).

Tensor conventions: ``Example.pixel_values`` is float32 ``[3, H, W]`` in ``[-1, 1]`` (RGB, channels
first); ``H = W = R`` (the resolution) unless aspect-ratio buckets are on, where ``(W, H)`` is the image's
bucket. ``Batch.pixel_values`` is ``[B, 3, H, W]``, same range; a batch never mixes buckets.

Exact resume without saved RNG state: every random choice of sample ``i`` in ``epoch`` (crop offsets,
flip, caption dropout, tag order) comes from generators seeded by :func:`example_seed` of
``(seed, epoch, i, stream)``, one stream for the image and one for the caption, so that turning flips on
does not change which captions are dropped. The order in which samples are visited is
:meth:`TrainDataset.epoch_order`, also a pure function of (seed, epoch). The training loop draws batches
from that order itself (no DataLoader shuffling); resuming at step ``s`` just skips ahead.

With aspect-ratio buckets (:mod:`tuner.data.buckets`) an epoch is a list of batches instead
(:meth:`TrainDataset.epoch_batches`): each bucket's samples shuffled and cut into batches (the last one of a
bucket may be smaller), then the epoch's batches shuffled; every permutation is seeded from (seed, epoch,
bucket), so micro-batch ``k`` is still a pure function of ``(seed, k)``. Prior preservation's class images
follow the instance batches (``partner``): batch ``k`` of the class set comes from the bucket of instance batch
``k``, so the two stack into one UNet batch.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset

from tuner.data.buckets import BucketPlan
from tuner.data.captions import process_caption
from tuner.data.folder import DatasetIndex
from tuner.data.images import crop_image, load_image, resize_short_side

# Stream tags keep the generators of one sample (and the epoch order) independent of each other.
IMAGE_STREAM = 0
CAPTION_STREAM = 1
ORDER_STREAM = 2
BUCKET_STREAM = 3
PAIR_STREAM = 4

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
    """float32 ``[3, H, W]`` in ``[-1, 1]`` (``H = W = R`` without buckets)."""
    caption: str
    """The caption after dropout / tag shuffling (``""`` when dropped)."""
    item_index: int
    """Index into ``DatasetIndex.items`` (the image this example was made from)."""
    flipped: bool
    """Whether the pixels were mirrored left-right."""
    original_size: tuple[int, int] = (0, 0)
    """(height, width) of the image file, upright (SDXL's ``original_size``)."""
    crop_top_left: tuple[int, int] = (0, 0)
    """(top, left) of the crop in the resized image (SDXL's ``crops_coords_top_left``)."""


@dataclass
class Batch:
    """A batch of examples, as the training loop consumes it."""

    pixel_values: torch.Tensor
    """float32 ``[B, 3, H, W]`` in ``[-1, 1]``."""
    captions: list[str]
    item_indices: list[int]
    flipped: list[bool]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    """Per example (height, width) of the image file."""
    crop_top_left: list[tuple[int, int]] = field(default_factory=list)
    """Per example (top, left) of the crop in the resized image."""

    def __len__(self) -> int:
        return len(self.captions)


def collate(examples: Sequence[Example]) -> Batch:
    """Stack examples (all of one size) into a :class:`Batch`, keeping their order."""
    if not examples:
        raise ValueError("collate needs at least one example")
    shapes = {tuple(e.pixel_values.shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"collate needs examples of one size, got {sorted(shapes)}")
    return Batch(
        pixel_values=torch.stack([e.pixel_values for e in examples]),
        captions=[e.caption for e in examples],
        item_indices=[e.item_index for e in examples],
        flipped=[e.flipped for e in examples],
        original_sizes=[e.original_size for e in examples],
        crop_top_left=[e.crop_top_left for e in examples],
    )


class TrainDataset(Dataset[Example]):
    """Training examples over a :class:`DatasetIndex`, each image repeated ``item.repeats`` times.

    Sample ``i`` belongs to item ``item_of(i)``; samples are laid out item by item (item 0's repeats
    first), and :meth:`epoch_order` shuffles them. Decoded images are kept in memory, already resized
    so their short side is ``resolution`` (the deterministic part); only crop, flip and caption edits
    are redone per example. ``center_crop=False`` crops at random; ``flip=True`` mirrors with p = 0.5.
    Transparent pixels are composited over ``background`` (RGB).

    Examples are ``resolution`` squares, or with ``buckets`` (a plan for ``index.items``) each image's bucket:
    resized to cover it (:func:`tuner.data.buckets.cover_size`) and cropped as above.

    ``partner`` (prior preservation with buckets; this dataset holds the class images): the instance dataset
    whose micro-batches this one follows. Micro-batch ``k`` then holds as many samples as the partner's
    micro-batch ``k``, all from the partner's bucket, drawn from ``(seed, k)`` (without repeats unless the
    bucket holds fewer samples than the batch). Every bucket of the partner must hold some of this dataset's
    images (:func:`tuner.data.buckets.plan_in_buckets` and the class-image cache see to it).
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
        buckets: BucketPlan | None = None,
        partner: TrainDataset | None = None,
    ):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if keep_tags < 0:
            raise ValueError(f"keep_tags must be >= 0, got {keep_tags}")
        if not index.items:
            raise ValueError("the dataset index has no items")
        if buckets is not None and len(buckets.assignments) != len(index.items):
            raise ValueError(f"the bucket plan has {len(buckets.assignments)} images, the index {len(index.items)}")
        self.index = index
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip = flip
        self.caption_dropout = caption_dropout
        self.shuffle_tags = shuffle_tags
        self.keep_tags = keep_tags
        self.seed = seed
        self.background = background
        self.buckets = buckets
        self.epoch = 0
        self._item_of = [k for k, item in enumerate(index.items) for _ in range(item.repeats)]
        self.partner = partner
        if partner is not None:
            if buckets is None or partner.buckets is None:
                raise ValueError("a partner dataset pairs bucketed batches: both need a bucket plan")
            have = {buckets.bucket_of(item) for item in self._item_of}
            lacking = [f"{w}x{h}" for w, h in partner.buckets.buckets if (w, h) not in have]
            if lacking:
                raise ValueError(f"no image of this dataset is in the partner's bucket(s) {', '.join(lacking)}")
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
        pixels, crop_top_left = crop_image(
            self._image(item_index),
            self.size_of(item_index),
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
        width, height = self.index.items[item_index].size
        return Example(pixel_values=pixels, caption=caption, item_index=item_index, flipped=flipped,
                       original_size=(height, width), crop_top_left=crop_top_left)

    def size_of(self, item_index: int) -> tuple[int, int]:
        """(width, height) of the examples of an item: its bucket, or the resolution square."""
        if self.buckets is not None:
            return self.buckets.bucket_of(item_index)
        return (self.resolution, self.resolution)

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which the samples of ``epoch`` are visited: a permutation of ``range(len(self))``."""
        generator = make_generator(self.seed, epoch, -1, ORDER_STREAM)
        return torch.randperm(len(self), generator=generator).tolist()

    def batches_per_epoch(self, batch_size: int) -> int:
        """Micro-batches in one epoch: ``len(self) / batch_size`` rounded up per bucket with buckets (a
        bucket's last batch may be smaller); without buckets batches run across epochs, so this is a ratio."""
        if self.buckets is None:
            return max(1, math.ceil(len(self) / batch_size))
        sizes = [self.buckets.bucket_of(item) for item in self._item_of]
        return sum(math.ceil(sizes.count(b) / batch_size) for b in set(sizes))

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """With buckets: the micro-batches (lists of sample indices, each from one bucket) of ``epoch`` in the
        order they are trained. Each bucket's samples are permuted (stream ``BUCKET_STREAM``, index = the
        bucket's place in the sorted bucket list) and cut into ``batch_size`` chunks; then the chunks are
        permuted (index -1)."""
        if self.buckets is None:
            raise ValueError("epoch_batches needs a bucket plan (without buckets see epoch_order)")
        chunks: list[list[int]] = []
        for b, bucket in enumerate(self.buckets.buckets):
            samples = [i for i, item in enumerate(self._item_of) if self.buckets.bucket_of(item) == bucket]
            order = torch.randperm(len(samples), generator=make_generator(self.seed, epoch, b, BUCKET_STREAM))
            shuffled = [samples[k] for k in order.tolist()]
            chunks += [shuffled[k : k + batch_size] for k in range(0, len(shuffled), batch_size)]
        order = torch.randperm(len(chunks), generator=make_generator(self.seed, epoch, -1, BUCKET_STREAM))
        return [chunks[k] for k in order.tolist()]

    def batch_samples(self, micro_step: int, batch_size: int) -> list[tuple[int, int]]:
        """``(epoch, sample index)`` of each example of micro-batch ``micro_step``: a pure function of the
        seed and ``micro_step``. Without buckets, positions ``k*B .. k*B+B-1`` of the stream made of each
        epoch's :meth:`epoch_order` in turn; with buckets, batch ``k mod n`` of epoch ``k div n``'s
        :meth:`epoch_batches` (n = :meth:`batches_per_epoch`)."""
        if self.partner is not None:
            return self._paired_samples(micro_step, batch_size)
        if self.buckets is not None:
            epoch, k = divmod(micro_step, self.batches_per_epoch(batch_size))
            return [(epoch, i) for i in self.epoch_batches(epoch, batch_size)[k]]
        n = len(self)
        picks, orders = [], {}
        for pos in range(micro_step * batch_size, (micro_step + 1) * batch_size):
            epoch, offset = divmod(pos, n)
            if epoch not in orders:
                orders[epoch] = self.epoch_order(epoch)
            picks.append((epoch, orders[epoch][offset]))
        return picks

    def _paired_samples(self, micro_step: int, batch_size: int) -> list[tuple[int, int]]:
        """Micro-batch ``micro_step`` of a dataset with a ``partner`` (class docstring)."""
        assert self.partner is not None and self.buckets is not None
        theirs = self.partner.batch_samples(micro_step, batch_size)
        epoch, first = theirs[0]
        bucket = self.partner.size_of(self.partner.item_of(first))
        pool = [i for i, item in enumerate(self._item_of) if self.buckets.bucket_of(item) == bucket]
        generator = make_generator(self.seed, micro_step, -1, PAIR_STREAM)
        picks: list[int] = []
        while len(picks) < len(theirs):
            picks += [pool[k] for k in torch.randperm(len(pool), generator=generator).tolist()]
        return [(epoch, i) for i in picks[: len(theirs)]]

    def deterministic_example(self, item_index: int, flipped: bool) -> torch.Tensor:
        """Centre-crop pixels of an item (mirrored if ``flipped``), for pre-computing cached latents.

        Equal to ``get(i, epoch).pixel_values`` for every sample of that item with the same flip when
        ``center_crop`` is on. float32 ``[3, H, W]`` in ``[-1, 1]``, at the item's size (:meth:`size_of`).
        """
        return crop_image(self._image(item_index), self.size_of(item_index), crop="center", flip=flipped)[0]

    def _image(self, item_index: int) -> Image.Image:
        image = self._images.get(item_index)
        if image is None:
            path = self.index.items[item_index].path
            image = load_image(path, self.background)
            if self.buckets is None:
                image = resize_short_side(image, self.resolution)
            elif image.size != self.buckets.assignments[item_index].resized:
                image = image.resize(self.buckets.assignments[item_index].resized, Image.Resampling.LANCZOS)
            self._images[item_index] = image
        return image
