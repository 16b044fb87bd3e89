"""Loading image files and turning them into training pixels.

Tensor convention (used by everything downstream of the data layer): pixels are ``float32``, channels
first (``[3, H, W]`` for one image, ``[B, 3, H, W]`` for a batch), RGB, scaled to ``[-1, 1]``
(``x / 127.5 - 1``), which is what the VAE encoder expects.

:func:`load_image` is the only place a file is decoded; every mode PIL can produce for our formats
(1, L, LA, P, PA, I, I;16, CMYK, YCbCr, RGBA, ...) comes out as 8-bit RGB, upright (EXIF orientation
applied), with transparency composited over a background colour.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tuner.errors import DataError

# Suffixes (lower case) that the folder scanner treats as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Modes PIL converts to RGB correctly; anything else (LAB, HSV...) would come out with wrong colours.
_CONVERTIBLE_MODES = ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "F", *_ALPHA_MODES)

CropMode = Literal["center", "random"]


class ImageLoadError(DataError):
    """An image file that cannot be used. ``path`` and ``reason`` are kept for skip reports."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: cannot load image: {reason}")


def load_image(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode ``path`` completely and return an upright 8-bit RGB image detached from the file.

    Transparent pixels are composited over ``background`` (an RGB triple). 16-bit images are scaled to
    8 bits (not clipped). Raises :class:`ImageLoadError` (a :class:`DataError`) naming the file and the
    reason: missing, not an image, truncated or corrupt, too large (PIL's decompression-bomb limit,
    ``PIL.Image.MAX_IMAGE_PIXELS``), or an unsupported colour mode.
    """
    path = Path(path)
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be an RGB triple of 0..255 values, got {background!r}")
    try:
        # A file just over the limit only warns in PIL; treat it as the error it is for us.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # full decode here, so a truncated file fails now and not mid-training
                upright = ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a folder, not a file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (PIL does not recognise the file's contents)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            path, f"too large (decompression-bomb guard, limit {Image.MAX_IMAGE_PIXELS} pixels): {exc}"
        ) from None
    except MemoryError:
        raise ImageLoadError(path, "too large to decode in memory") from None
    except Exception as exc:  # PIL raises many types for damaged files; all of them mean "unusable"
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            raise ImageLoadError(path, f"truncated file ({message})") from None
        raise ImageLoadError(path, f"corrupt or unreadable ({type(exc).__name__}: {message})") from None
    return _to_rgb(upright, path, (int(background[0]), int(background[1]), int(background[2])))


def _to_rgb(img: Image.Image, path: Path, background: tuple[int, int, int]) -> Image.Image:
    """Convert a decoded image of any supported mode to RGB, compositing transparency over background."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L/RGB conversion clips at 255 (almost everything turns white); scale instead.
        values = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode not in _CONVERTIBLE_MODES:
        raise ImageLoadError(path, f"unsupported colour mode {img.mode!r}")
    try:
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", img.size, (*background, 255))
            return Image.alpha_composite(base, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(path, f"cannot convert colour mode {img.mode!r} to RGB ({exc})") from None


def resize_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize (Lanczos) so that the shorter side is ``resolution`` pixels, keeping the aspect ratio.

    The longer side is rounded to the nearest pixel and never below ``resolution``. An image whose short
    side already equals ``resolution`` is returned unchanged (the same object).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    width, height = img.size
    short = min(width, height)
    if short == resolution:
        return img
    scale = resolution / short
    if width <= height:
        size = (resolution, max(resolution, round(height * scale)))
    else:
        size = (max(resolution, round(width * scale)), resolution)
    return img.resize(size, Image.Resampling.LANCZOS)


def prepare_image(
    img: Image.Image,
    resolution: int,
    crop: CropMode = "center",
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize, crop and optionally mirror an RGB image into a ``[3, resolution, resolution]`` tensor.

    The short side is resized to ``resolution`` (see :func:`resize_short_side`), then a square is cut:
    centred (``crop="center"``) or at offsets drawn from ``generator`` (``crop="random"``: first the x
    offset, then the y offset, each ``torch.randint`` over every valid position; both are always drawn,
    so the generator advances by the same amount for every image). ``flip=True`` mirrors left-right
    unconditionally: the caller decides whether to flip. Returns float32 in ``[-1, 1]``.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if crop == "random" and generator is None:
        raise ValueError("crop='random' needs a torch.Generator (randomness is never drawn globally)")
    if img.mode != "RGB":
        raise ValueError(f"prepare_image expects an RGB image (use load_image), got mode {img.mode!r}")
    img = resize_short_side(img, resolution)
    pixels, _ = crop_image(img, (resolution, resolution), crop=crop, flip=flip, generator=generator)
    return pixels


def crop_image(
    img: Image.Image,
    size: tuple[int, int],
    crop: CropMode = "center",
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a ``size = (width, height)`` window out of ``img`` (already resized to cover it) and mirror it if
    ``flip``. ``crop="random"`` draws the x offset, then the y offset, from ``generator`` (each a
    ``torch.randint`` over every valid position, both always drawn). Returns float32 ``[3, height, width]``
    in ``[-1, 1]`` and the crop's ``(top, left)`` in the resized image (SDXL's ``crops_coords_top_left``)."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if crop == "random" and generator is None:
        raise ValueError("crop='random' needs a torch.Generator (randomness is never drawn globally)")
    target_w, target_h = size
    width, height = img.size
    if width < target_w or height < target_h:
        raise ValueError(f"cannot crop {target_w}x{target_h} out of a {width}x{height} image")
    if crop == "random":
        left = int(torch.randint(0, width - target_w + 1, (1,), generator=generator).item())
        top = int(torch.randint(0, height - target_h + 1, (1,), generator=generator).item())
    else:
        left = (width - target_w) // 2
        top = (height - target_h) // 2
    img = img.crop((left, top, left + target_w, top + target_h))
    return pil_to_tensor(img, flip=flip), (top, left)


def pil_to_tensor(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """An RGB PIL image as a float32 ``[3, H, W]`` tensor in ``[-1, 1]``; ``flip`` mirrors it left-right."""
    array = np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only buffers)
    if flip:
        array = np.ascontiguousarray(array[:, ::-1])
    tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0
