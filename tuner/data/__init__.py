"""The data layer: dataset folders and captions in, deterministic training examples out.

- ``images``: decoding any image file to upright RGB; resize / crop / flip to ``[3, R, R]`` tensors in
  ``[-1, 1]`` (float32, RGB, channels first).
- ``captions``: reading caption files, caption dropout and tag shuffling (seeded), tag counts.
- ``folder``: scanning a dataset folder (captions, kohya ``N_name`` repeat folders, metadata.jsonl).
- ``dataset``: :class:`TrainDataset`, the :class:`Example` / :class:`Batch` types and ``collate``.

Components take plain arguments; they never read the recipe (STYLE.md #5).
"""

from tuner.data.captions import process_caption, read_caption, tag_frequency
from tuner.data.dataset import Batch, Example, TrainDataset, collate
from tuner.data.folder import DataItem, DatasetIndex, scan_dataset
from tuner.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image, prepare_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "DataItem",
    "DatasetIndex",
    "Example",
    "ImageLoadError",
    "TrainDataset",
    "collate",
    "load_image",
    "prepare_image",
    "process_caption",
    "read_caption",
    "scan_dataset",
    "tag_frequency",
]
