"""Scanning a dataset folder into a :class:`DatasetIndex` (which images, which captions, how often).

Layout understood (one level of subfolders, no deeper):

- images (``.png .jpg .jpeg .webp .bmp``, any case) directly in the root, seen ``default_repeats``
  times per epoch;
- kohya-style repeat folders ``N_name`` (``N`` a positive integer) whose images are seen ``N`` times per
  epoch; any other subfolder is scanned with ``default_repeats``. Unlike kohya, ``name`` is not taken as
  a class word: it is only recorded (as the folder's name in summaries and metadata);
- captions, first match wins: ``image.txt`` beside the image; an entry in ``metadata.jsonl`` (Hugging
  Face imagefolder convention: ``file_name`` plus a ``text``, ``caption`` or ``prompt`` column, looked for
  in that order) in the image's folder, or in the root with ``file_name`` = ``subfolder/image.png``;
  the instance prompt. An image with none of these is an error.

Names starting with ``.`` (hidden files, ``.ipynb_checkpoints``...) are ignored. Every image is decoded
once while scanning, so an unreadable file is found now rather than in the middle of training.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.data.captions import normalize_caption, read_caption, tag_frequency
from tuner.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from tuner.errors import DataError

METADATA_FILE = "metadata.jsonl"
CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption", "prompt")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MIN_SIDE = 8
"""Images whose shorter side is below this many pixels are skipped (reported) while scanning."""


@dataclass(frozen=True)
class DataItem:
    """One training image.

    ``folder`` names its folder in summaries: the subfolder's name, or for images directly in the root
    the root's own name (``"."`` if a subfolder has that same name).
    """

    path: Path
    caption: str
    repeats: int
    folder: str
    caption_source: str = "txt"
    """Where the caption came from: ``"txt"``, ``"metadata"`` or ``"instance_prompt"``."""
    size: tuple[int, int] = (0, 0)
    """(width, height) of the upright image in pixels, as decoded while scanning ((0, 0) if unknown)."""


@dataclass
class DatasetIndex:
    """The usable images of a dataset folder, in a deterministic order (folders, then file names)."""

    root: Path
    items: list[DataItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Unreadable images left out, as (path, reason). The caller reports them."""
    ignored_dirs: list[Path] = field(default_factory=list)
    """Folders deeper than one level, which are not scanned. The caller may mention them."""

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def samples_per_epoch(self) -> int:
        """Number of examples in one epoch: every image counted ``repeats`` times."""
        return sum(item.repeats for item in self.items)

    def summary(self, resolution: int = 0) -> str:
        """One line for logs: images, folders, samples per epoch, skips; with ``resolution``, how many images
        are smaller than it (they are upscaled, which blurs them)."""
        folders = len({item.folder for item in self.items})
        text = (f"dataset {self.root}: {self.num_images} images in {folders} folder(s), "
                f"{self.samples_per_epoch} samples per epoch; {len(self.skipped)} file(s) skipped")
        if self.skipped:
            text += " (listed above)"
        small = [item for item in self.items if 0 < min(item.size) < resolution]
        if small:
            worst = min(small, key=lambda item: min(item.size))
            text += (f"; {len(small)} image(s) are smaller than {resolution} px on the short side and will be "
                     f"upscaled (smallest: {worst.path.name}, {worst.size[0]}x{worst.size[1]})")
        return text

    def folder_summary(self) -> dict[str, dict[str, int]]:
        """Per folder: ``{"10_sks": {"n_repeats": 10, "img_count": 6}}`` (kohya's ``ss_dataset_dirs``)."""
        summary: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = summary.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return summary

    def tag_frequency_by_folder(self) -> dict[str, dict[str, int]]:
        """Per folder, tag -> number of images whose caption has it (kohya's ``ss_tag_frequency``)."""
        captions: dict[str, list[str]] = {}
        for item in self.items:
            captions.setdefault(item.folder, []).append(item.caption)
        return {folder: tag_frequency(texts) for folder, texts in captions.items()}


def scan_dataset(
    root: str | Path,
    *,
    instance_prompt: str = "",
    default_repeats: int = 1,
    strict: bool = False,
    min_side: int = MIN_SIDE,
) -> DatasetIndex:
    """Find the images and captions under ``root`` (layout in the module docstring).

    Unreadable images, and images whose shorter side is below ``min_side`` pixels (a 1x1 file teaches
    nothing), go to ``index.skipped``; with ``strict=True`` they are instead reported together in
    one :class:`DataError`. Caption problems (invalid UTF-8, a broken ``metadata.jsonl``, an image with
    no caption when ``instance_prompt`` is empty) are always errors, all reported together. A missing
    folder, a ``0_name`` folder, or a folder with no usable image is a :class:`DataError` too.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    if default_repeats < 1:
        raise DataError(f"repeats must be a positive integer, got {default_repeats}")
    instance_prompt = normalize_caption(instance_prompt)

    index = DatasetIndex(root=root)
    problems: list[str] = []
    root_metadata = _read_metadata(root, problems)
    for folder, repeats, name in _folders(root, default_repeats, index.ignored_dirs):
        metadata = root_metadata if folder == root else _read_metadata(folder, problems)
        for path in image_files(folder):
            try:
                size = load_image(path).size
            except ImageLoadError as exc:
                index.skipped.append((path, exc.reason))
                continue
            if min(size) < min_side:
                index.skipped.append(
                    (path, f"too small ({size[0]}x{size[1]} px; at least {min_side} px on the short side)")
                )
                continue
            found = _find_caption(path, root, metadata, root_metadata, instance_prompt, problems)
            if found is not None:
                caption, source = found
                index.items.append(DataItem(path, caption, repeats, name, source, size))

    if strict and index.skipped:
        problems.extend(f"{path}: unreadable image: {reason}" for path, reason in index.skipped)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        hint = " (strict mode: fix or remove the unreadable images, or turn strict off to skip them)"
        raise DataError(
            f"{len(problems)} problem(s) in dataset {root}{hint if strict and index.skipped else ''}:\n{lines}"
        )
    if not index.items:
        looked_for = " ".join(f"*{ext}" for ext in IMAGE_EXTENSIONS)
        message = (
            f"no usable image in dataset folder {root}: looked for {looked_for} (any case) in it and in its "
            "immediate subfolders (such as kohya-style N_name repeat folders)"
        )
        if index.skipped:
            message += f"; {len(index.skipped)} unreadable file(s) were skipped:\n" + "\n".join(
                f"  - {path}: {reason}" for path, reason in index.skipped
            )
        raise DataError(message)
    return index


def _folders(root: Path, default_repeats: int, ignored: list[Path]) -> list[tuple[Path, int, str]]:
    """(folder, repeats, name) for the root and each immediate subfolder, in sorted order."""
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    root_name = root.resolve().name or str(root)
    if root_name in {sub.name for sub in subfolders}:
        root_name = "."  # keep the root's images apart from a subfolder that has the root's name
    folders: list[tuple[Path, int, str]] = [(root, default_repeats, root_name)]
    for sub in subfolders:
        match = _REPEAT_FOLDER.match(sub.name)
        repeats = default_repeats
        if match:
            repeats = int(match.group(1))
            if repeats < 1:
                raise DataError(
                    f"{sub}: a repeat folder's count must be a positive integer (N_name with N >= 1); "
                    "rename it, or move it out of the dataset folder to leave it out"
                )
        folders.append((sub, repeats, sub.name))
        ignored.extend(sorted(p for p in sub.iterdir() if p.is_dir() and not p.name.startswith(".")))
    return folders


def image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()
    )


def _find_caption(
    path: Path,
    root: Path,
    metadata: dict[str, str],
    root_metadata: dict[str, str],
    instance_prompt: str,
    problems: list[str],
) -> tuple[str, str] | None:
    """(caption, source) for ``path``, or None after appending the reason to ``problems``."""
    txt = path.with_suffix(".txt")
    if txt.is_file():
        try:
            return read_caption(txt), "txt"
        except DataError as exc:
            problems.append(str(exc))
            return None
    if path.name in metadata:
        return metadata[path.name], "metadata"
    relative = path.relative_to(root).as_posix()
    if relative in root_metadata:
        return root_metadata[relative], "metadata"
    if instance_prompt:
        return instance_prompt, "instance_prompt"
    problems.append(
        f"{path}: no caption and no instance_prompt (looked for {txt.name} and a {METADATA_FILE} entry)"
    )
    return None


def _read_metadata(folder: Path, problems: list[str]) -> dict[str, str]:
    """``file_name`` (relative to ``folder``, posix) -> caption from ``folder/metadata.jsonl``, if any."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        rows = _load_jsonl(path)
    except DataError as exc:
        problems.append(str(exc))
        return {}
    columns: set[str] = set().union(*(row.keys() for row in rows)) if rows else set()
    if "file_name" not in columns:
        problems.append(f"{path}: no 'file_name' column (columns: {sorted(columns)})")
        return {}
    column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if column is None:
        problems.append(
            f"{path}: no caption column: expected one of {list(CAPTION_COLUMNS)}, found {sorted(columns)}"
        )
        return {}
    captions: dict[str, str] = {}
    for line, row in enumerate(rows, start=1):
        name, caption = row.get("file_name"), row.get(column)
        if not isinstance(name, str) or caption is None:
            continue
        if not isinstance(caption, str):
            problems.append(f"{path}, row {line}: {column!r} must be a string, got {type(caption).__name__}")
            continue
        key = Path(name.replace("\\", "/")).as_posix()
        if key in captions:
            problems.append(f"{path}, row {line}: file_name {name!r} appears more than once")
            continue
        captions[key] = normalize_caption(caption)
    return captions


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file read with ``datasets`` (packaged json builder: local only, no hub calls).

    A throw-away cache folder is used so that nothing lands in (or is served stale from) the user's
    Hugging Face cache, and the rows are read into memory before it is removed.
    """
    # Deferred: slow to import, and only needed for metadata.jsonl datasets.
    from datasets.load import load_dataset
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    progress_was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="tuner-metadata-") as cache:
            table = load_dataset(
                "json", data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
            return [row for row in table.to_list() if isinstance(row, dict)]
    except Exception as exc:  # datasets/pyarrow raise assorted types for a malformed file
        cause = exc.__cause__ or exc.__context__ or exc
        raise DataError(f"{path}: cannot read metadata ({type(cause).__name__}: {cause})") from None
    finally:
        if not progress_was_disabled:
            enable_progress_bars()
