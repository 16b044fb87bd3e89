"""Captions: reading them from files, and the per-example random edits (dropout, tag shuffling).

A caption is one line of text; a "tag" is one comma-separated part of it (booru-style captions such as
``"sks, 1girl, red hair"``). Randomness always comes from a ``torch.Generator`` passed in, never from a
global RNG, so that an example can be rebuilt exactly from its seed (see ``dataset.py``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from tuner.errors import DataError


def normalize_caption(text: str) -> str:
    """Strip and collapse every run of whitespace (newlines included) into one space."""
    return " ".join(text.split())


def read_caption(path: str | Path) -> str:
    """Read a UTF-8 caption file (a BOM is allowed), stripped, with whitespace collapsed to single spaces.

    Raises :class:`DataError` naming the file if it cannot be read or is not valid UTF-8 (with the byte
    offset of the first bad byte, so the user can find it).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read caption file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        bad = raw[offset : offset + 4]
        raise DataError(
            f"{path}: caption is not valid UTF-8 (byte offset {offset}: {bad!r}); "
            "re-save the file with UTF-8 encoding"
        ) from None
    return normalize_caption(text)


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of ``caption``, each stripped; empty tags are dropped."""
    return [tag for tag in (part.strip() for part in caption.split(",")) if tag]


def process_caption(
    caption: str,
    *,
    dropout: float = 0.0,
    shuffle_tags: bool = False,
    keep_tags: int = 0,
    generator: torch.Generator,
) -> str:
    """Apply the random caption edits of one training example.

    Draw order (fixed, so results depend only on the generator's seed): if ``dropout > 0``, one uniform
    number decides dropout (``""`` is returned with probability ``dropout``, and nothing more is drawn);
    then, if ``shuffle_tags``, one ``torch.randperm`` over the tags after the first ``keep_tags``.
    Shuffled tags are re-joined with ``", "`` (empty tags dropped). With ``shuffle_tags=False`` the
    caption is returned unchanged (unless dropped).
    """
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {dropout}")
    if keep_tags < 0:
        raise ValueError(f"keep_tags must be >= 0, got {keep_tags}")
    if dropout > 0.0 and float(torch.rand((), generator=generator)) < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep_tags], tags[keep_tags:]
    if len(rest) > 1:
        order = torch.randperm(len(rest), generator=generator).tolist()
        rest = [rest[k] for k in order]
    return ", ".join(kept + rest)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many times each tag occurs over ``captions`` (tags lower-cased and stripped, empty ones ignored).

    This is the per-folder shape of kohya's ``ss_tag_frequency`` metadata. Sorted by descending count,
    then alphabetically, so the result is deterministic.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(split_tags(caption.lower()))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# Words too common to say anything about a dataset (left out of word counts).
STOP_WORDS = frozenset("a an and at by for from in into is of on or the to with".split())


def word_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions use each word (lower-cased; split on anything but letters, digits, ``_`` and
    ``'``; :data:`STOP_WORDS` left out). For sentence captions, where :func:`tag_frequency` sees one tag per
    caption. Sorted like :func:`tag_frequency`."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update({w for w in re.findall(r"[\w']+", caption.lower()) if w not in STOP_WORDS})
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
