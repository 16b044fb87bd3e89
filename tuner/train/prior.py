"""DreamBooth prior preservation: the class images.

The base model, before any training, draws ``count`` images from the class prompts into a folder, each with
a ``.txt`` caption holding its prompt. The folder is a cache: images already there (generated earlier, or
supplied by the user with captions) are reused, and only the missing ones are drawn. The folder is then an
ordinary dataset (``tuner.data.folder.scan_dataset``).

With aspect-ratio buckets the instance batches come in several shapes, and each is paired with class images
of the same bucket (:class:`tuner.data.dataset.TrainDataset` ``partner``), so the cache is kept per bucket:
every instance bucket needs its quota of class images (a share of ``count`` in proportion to the instance
samples in it, at least one), counting the images already there by the bucket they fall in
(:func:`tuner.data.buckets.plan_in_buckets`); the missing ones are drawn at that bucket's size, as
``class_<W>x<H>_<j>.png`` from ``prompts[j % len(prompts)]`` with seed ``seed + j``.

Each image tuner draws records its prompt and the base's :meth:`~tuner.models.base.BaseModel.fingerprint`
in its PNG parameters. Images in the folder that tuner drew with another base (say, before an upgrade of the
embedded base, or with a different ``model.base``), or from a prompt no longer in ``prompts``, are not this
recipe's class images: they are deleted, with their captions, and drawn again, and the log says so. Images
without a fingerprint (the user's own, or another tool's) are always kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from tuner.data.buckets import Size, assign_bucket
from tuner.data.folder import image_files
from tuner.errors import TunerError
from tuner.formats.io import write_bytes_atomic
from tuner.models.base import BaseModel
from tuner.sample.png import infotext, save_png
from tuner.sample.sampler import SampleSettings, sample_images


def count_images(folder: Path) -> int:
    return len(image_files(folder)) if folder.is_dir() else 0


def ensure_class_images(
    base: BaseModel,
    folder: str | Path,
    *,
    prompts: Sequence[str],
    count: int,
    settings: SampleSettings,
    seed: int = 0,
    log=print,
    quotas: Mapping[Size, int] | None = None,
) -> Path:
    """Make ``folder`` hold at least ``count`` captioned class images; returns the folder.

    Image ``i`` (``class_00000.png`` ...) is drawn from ``prompts[i % len(prompts)]`` with seed ``seed + i``,
    so a cache filled in several runs equals one filled at once (up to the float rounding of batched kernels
    when ``settings.batch_size`` > 1). Each image and caption is written to a temporary name and renamed, so
    an interrupted run leaves no half-written file.

    ``quotas`` (aspect-ratio buckets; ``(width, height)`` -> images, from
    :func:`tuner.data.buckets.bucket_quotas`): the folder must hold that many images in each bucket instead
    (module docstring); ``count`` is then only reported.
    """
    folder = Path(folder)
    fingerprint = base.fingerprint()
    _drop_stale(folder, fingerprint, prompts, log)
    if quotas:
        return _ensure_per_bucket(base, folder, prompts=prompts, quotas=quotas, settings=settings, seed=seed,
                                  fingerprint=fingerprint, log=log)
    have = count_images(folder)
    if have >= count:
        log(f"prior preservation: reusing {have} class images in '{folder}'")
        return folder
    if not prompts:
        raise TunerError(
            f"prior preservation: '{folder}' holds {have} of the {count} class images and prior.class_prompts is "
            "empty, so the missing ones cannot be generated; add class prompts or more captioned images"
        )
    _create(folder)
    log(f"prior preservation: generating {count - have} class images into '{folder}' ({have} already there)")
    jobs = []  # the first free names, until the folder (the user's own images counted) holds ``count``
    for i in range(count):
        png = folder / f"class_{i:05d}.png"
        if have + len(jobs) >= count:
            break
        if not png.exists():
            jobs.append((prompts[i % len(prompts)], seed + i, png))
    with tqdm(total=len(jobs), desc="class images", unit="img", leave=False) as bar:
        _draw(base, jobs, settings, fingerprint, bar)
    return folder


def _create(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TunerError(f"prior preservation: cannot create the class image folder '{folder}': {exc}") from exc


FINGERPRINT_FIELD = "Base fingerprint"


def drawn_by(png: Path) -> tuple[str, str] | None:
    """``(base fingerprint, prompt)`` of a class image tuner drew (from its PNG parameters); None for any
    other image, or an unreadable one."""
    try:
        with Image.open(png) as image:  # text chunks come with the header
            text = str(image.info.get("parameters", ""))
    except (OSError, ValueError):
        return None
    marker = f"{FINGERPRINT_FIELD}: "
    at = text.rfind(marker)
    fingerprint = text[at + len(marker):].split(",")[0].strip() if at >= 0 else ""
    return (fingerprint, text.split("\n")[0]) if fingerprint else None


def _drop_stale(folder: Path, fingerprint: str, prompts: Sequence[str], log) -> None:
    """Delete the class images (and captions) in ``folder`` that tuner drew with another base, or from a
    prompt that is no longer among ``prompts``; they are drawn again. With no prompts nothing could be
    redrawn, so they are only reported."""
    if not folder.is_dir():
        return
    reasons: Counter[str] = Counter()
    stale = []
    for png in image_files(folder):
        drawn = drawn_by(png)
        if drawn is None:
            continue
        if drawn[0] != fingerprint:
            reasons[f"drawn by another base (fingerprint {drawn[0]}; this base is {fingerprint})"] += 1
        elif prompts and drawn[1] not in prompts:
            reasons["drawn from a prompt no longer in prior.class_prompts"] += 1
        else:
            continue
        stale.append(png)
    if not stale:
        return
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
    if not prompts:
        log(f"WARNING: prior preservation: class images in '{folder}': {why}. prior.class_prompts is empty, so "
            "they are used as they are; delete them and give class prompts to draw them with this base")
        return
    for png in stale:
        png.unlink()
        png.with_suffix(".txt").unlink(missing_ok=True)
    log(f"prior preservation: deleted {len(stale)} class images in '{folder}' ({why}); they are drawn again")


def _draw(
    base: BaseModel, jobs: Sequence[tuple[str, int, Path]], settings: SampleSettings, fingerprint: str, bar: tqdm
) -> None:
    """Class images for ``(prompt, seed, png)`` jobs, ``settings.batch_size`` at a time; each written as its
    ``png`` (with A1111 parameters and the base's fingerprint) and its caption as soon as its batch is done."""
    size = max(1, settings.batch_size)
    for start in range(0, len(jobs), size):
        batch = jobs[start : start + size]
        images = sample_images(base, [prompt for prompt, _, _ in batch], [seed for _, seed, _ in batch], settings)
        for (prompt, seed, png), image in zip(batch, images, strict=True):
            write_bytes_atomic(png.with_suffix(".txt"), (prompt + "\n").encode("utf-8"))
            save_png(image, png, parameters=infotext(
                prompt=prompt, negative=settings.negative, steps=settings.steps, sampler=settings.sampler,
                cfg=settings.cfg, seed=seed, width=image.width, height=image.height,
                extra={FINGERPRINT_FIELD: fingerprint},
            ))
        bar.update(len(batch))


def _image_size(path: Path) -> Size:
    with Image.open(path) as image:  # reads the header only
        return image.size


def _ensure_per_bucket(
    base: BaseModel, folder: Path, *, prompts: Sequence[str], quotas: Mapping[Size, int],
    settings: SampleSettings, seed: int, fingerprint: str, log=print,
) -> Path:
    buckets = sorted(quotas)
    files = image_files(folder) if folder.is_dir() else []
    have = Counter(assign_bucket(_image_size(p), buckets).bucket for p in files)
    missing = {b: q - have[b] for b, q in sorted(quotas.items()) if have[b] < q}
    shown = ", ".join(f"{w}x{h}: {have[(w, h)]}/{q}" for (w, h), q in sorted(quotas.items()))
    if not missing:
        log(f"prior preservation: reusing {len(files)} class images in '{folder}' (per bucket: {shown})")
        return folder
    if not prompts:
        raise TunerError(
            f"prior preservation: '{folder}' lacks class images in some aspect-ratio buckets (held/needed: "
            f"{shown}) and prior.class_prompts is empty, so the missing ones cannot be generated; add class "
            "prompts, or captioned class images of those shapes"
        )
    _create(folder)
    log(f"prior preservation: generating {sum(missing.values())} class images into '{folder}' in the instance "
        f"buckets (held/needed: {shown})")
    with tqdm(total=sum(missing.values()), desc="class images", unit="img", leave=False) as bar:
        for (w, h), n in missing.items():
            jobs, j = [], 0
            while len(jobs) < n:
                png = folder / f"class_{w}x{h}_{j:05d}.png"
                if not png.exists():
                    jobs.append((prompts[j % len(prompts)], seed + j, png))
                j += 1
            _draw(base, jobs, replace(settings, width=w, height=h), fingerprint, bar)
    return folder
