"""DreamBooth prior preservation: the class images.

The base model, before any training, draws ``count`` images from the class prompts into a folder, each with
a ``.txt`` caption holding its prompt. The folder is a cache: images already there (generated earlier, or
supplied by the user with captions) are reused, and only the missing ones are drawn. The folder is then an
ordinary dataset (``tuner.data.folder.scan_dataset``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

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
) -> Path:
    """Make ``folder`` hold at least ``count`` captioned class images; returns the folder.

    Image ``i`` (``class_00000.png`` ...) is drawn from ``prompts[i % len(prompts)]`` with seed ``seed + i``,
    so a cache filled in several runs equals one filled at once. Each image and caption is written to a
    temporary name and renamed, so an interrupted run leaves no half-written file.
    """
    folder = Path(folder)
    have = count_images(folder)
    if have >= count:
        log(f"prior preservation: reusing {have} class images in '{folder}'")
        return folder
    if not prompts:
        raise TunerError(
            f"prior preservation: '{folder}' holds {have} of the {count} class images and prior.class_prompts is "
            "empty, so the missing ones cannot be generated; add class prompts or more captioned images"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TunerError(f"prior preservation: cannot create the class image folder '{folder}': {exc}") from exc
    log(f"prior preservation: generating {count - have} class images into '{folder}' ({have} already there)")
    for i in tqdm(range(count), desc="class images", unit="img", leave=False):
        png = folder / f"class_{i:05d}.png"
        if png.exists():
            continue
        if count_images(folder) >= count:
            break
        prompt = prompts[i % len(prompts)]
        image = sample_images(base, [prompt], [seed + i], settings)[0]
        write_bytes_atomic(png.with_suffix(".txt"), (prompt + "\n").encode("utf-8"))
        save_png(image, png, parameters=infotext(
            prompt=prompt, negative=settings.negative, steps=settings.steps, sampler=settings.sampler,
            cfg=settings.cfg, seed=seed + i, width=image.width, height=image.height,
        ))
    return folder
