"""Judge a toy-world image from its pixels alone (WORLD.md, "How an image is judged").

Used by the quality checks: a generated image is judged and compared with the scene its prompt asked for.
The judge knows only the world's rules (palette, shapes, sizes, positions), never how the image was made,
and it is built to tolerate what a small diffusion model produces: soft edges, colour drift, noise, specks.

Steps, with the thresholds and why:

1. **Background**: the per-channel median of the 2-pixel border frame (496 pixels), named by the nearest
   palette entry. A median ignores an object that pokes into the frame, as long as most of the frame is
   background.
2. **Object mask**, in two passes, both measuring RGB distance to the *measured* background median (not the
   palette entry, so a global colour drift does not leak into the mask):

   - pass 1: distance > :data:`OBJECT_THRESHOLD` = 38, half the smallest distance between two colours
     of the world (orange-yellow, 75.8). Any object colour is at least 75.8 from any background, so object
     pixels pass even if blurred halfway towards the background, while background noise must exceed 38
     (Gaussian noise of sigma 10 per channel does so for ~0.2 % of pixels: isolated specks, see below).
   - pass 2: distance > max(38, half the distance between the background and the object's colour, the
     median of the pass-1 mask's core). This puts the edge of a blurred object at its half-way point, so
     soft edges neither grow nor shrink the object (which matters for size and shape); for crisp images it
     changes nothing.

   After each pass, 8-connected components smaller than max(:data:`MIN_COMPONENT_PX` = 4 px,
   :data:`MIN_COMPONENT_FRACTION` = 10 % of the largest component) are dropped as specks. Every shape of the
   world is one connected piece, so anything much smaller than the main piece is noise; keeping pieces of
   >= 10 % still lets a shape that a model drew broken in two keep its true bounding box.
   If fewer than :data:`MIN_OBJECT_PX` = 16 pixels remain (the smallest object of the world, a small star or
   triangle, has ~130), the image is judged **empty**.
3. **Colour**: the per-channel median of the object's *core* (the mask eroded by a 3x3 square, or the whole
   mask if that leaves < 16 px), nearest of palette + pink. Edge pixels of a soft image are mixed with the
   background; the core is not (on a 3-pixel outline it is the middle line).
4. **Size**: from the mask's bounding box. Each shape's larger bbox side lies in [0.8 S, S] (square 1.6R is the
   narrowest), i.e. 16-20 px for small and 28-36 px for large, so the larger side is compared with
   :data:`SIZE_SPLIT_PX` = 24 (half-way between 20 and 28). Plain "nearest of 20/36" would be a tie for a
   large square (28 px).
5. **Position**: the bbox centre's x, nearest of cx = 20 / 32 / 44 (every shape is left-right symmetric).
6. **Shape and style**: each candidate (8 shapes + hexagram, each filled and as a 3-pixel outline, plus
   ``"hexagram/holed"``: the hexagram with the sks centre disc of radius :data:`SKS_DISC_FRACTION` = 0.3 R
   cut out) is drawn in the world's box at the judged size and position, and also shifted so that its bbox
   centre meets the object's (to forgive a model that draws a little off-place); the candidate with the
   highest IoU with the object mask wins. ``is_outline`` is true when the winner is an outline. Ties go to the filled shape
   (a small ring is the only world shape whose 3-pixel outline is the shape itself). The holed hexagram is
   what the object mask of the sks subject on a *white* background looks like: its white centre disc is
   background there, so the mask is a purple hexagram with a hole (a small one would otherwise be judged
   a hexagram outline, a large one a poorly matching filled hexagram). It is judged shape ``hexagram``, not
   an outline.
7. **sks subject**: the winner is a filled or holed hexagram, the colour is purple, and at least half of the
   pixels within :data:`SKS_CENTRE_FRACTION` = 0.2 R of the bbox centre are *white-like*: nearer to white
   than to purple, and, unless the background is judged white, also nearer to white than to the measured
   background. On a white background the centre disc and the background are the same colour, so a
   background-coloured hole is exactly what the subject looks like there; on any other background a
   background-coloured hole is not the subject (and yellow or orange, being nearer to white than to purple,
   would otherwise pass). A plain purple hexagram has a purple centre and is never the subject.

Images are 64 x 64 RGB. PIL images of another size are resized (bilinear) to 64 x 64 first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tuner.errors import TunerError
from tuner.tiny.world import (
    ALL_SHAPES,
    CANVAS,
    CY,
    HEXAGRAM,
    OBJECT_COLORS,
    PALETTE,
    POSITIONS,
    SIZES,
    SKS,
    Scene,
    outline_mask,
    shape_mask,
)

BORDER_PX = 2
OBJECT_THRESHOLD = 38.0
MIN_COMPONENT_PX = 4
MIN_COMPONENT_FRACTION = 0.10
MIN_OBJECT_PX = 16
SIZE_SPLIT_PX = 24
SKS_CENTRE_FRACTION = 0.2  # radius of the probed centre, as a fraction of R (the white disc is 0.3 R)
SKS_DISC_FRACTION = 0.3  # WORLD.md: the sks subject's white centre disc has radius 0.3 R
HOLED = "holed"  # style part of the candidate key "hexagram/holed" (the hexagram minus the sks centre disc)


@dataclass(frozen=True)
class Judgement:
    """What an image shows, judged from pixels.

    ``background``: palette name (always set). ``color``: palette name or ``"pink"``. ``shape``: one of
    ``SHAPES`` or ``"hexagram"``. ``size``: ``small``/``large``. ``position``: ``left``/``center``/``right``.
    Object fields are ``None`` when ``empty``. ``iou``: IoU of the object mask with the winning candidate
    (0 when empty). ``is_outline``: the winner is an outline. ``is_sks_subject``: purple hexagram with a white
    centre (on a white background: with a background-coloured hole). ``bbox``: ``(x0, y0, x1, y1)``,
    end-exclusive, of the object mask. ``area``: object pixels.
    ``ious``: best IoU per candidate, keyed ``"circle"``, ``"circle/outline"``, ..., and ``"hexagram/holed"``
    (the hexagram with the sks centre disc cut out; see the module docstring, step 6).
    """

    background: str
    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    iou: float = 0.0
    is_outline: bool = False
    is_sks_subject: bool = False
    empty: bool = True
    bbox: tuple[int, int, int, int] | None = None
    area: int = 0
    ious: dict[str, float] = field(default_factory=dict)


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """``image`` as ``(64, 64, 3)`` float64 RGB in 0..255.

    Accepts PIL images (any mode; converted to RGB, resized to 64 x 64 if needed) and arrays ``(64, 64, 3)``
    or ``(64, 64, 4)`` (alpha dropped), either uint8 or float in [0, 1].
    """
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
        if img.size != (CANVAS, CANVAS):
            img = img.resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float64)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[:2] != (CANVAS, CANVAS) or a.shape[2] not in (3, 4):
        raise TunerError(f"cannot judge an array of shape {a.shape}; expected ({CANVAS}, {CANVAS}, 3)")
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
    return a.astype(np.float64)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = np.linalg.norm(np.asarray([table[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(d))]


def _border(a: np.ndarray) -> np.ndarray:
    """The pixels of the ``BORDER_PX`` frame, ``(n, 3)``."""
    b = BORDER_PX
    frame = np.ones(a.shape[:2], dtype=bool)
    frame[b:-b, b:-b] = False
    return a[frame]


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of ``mask`` (0 = outside; each component gets one positive label).

    Max-label propagation with pointer jumping: labels start as pixel index + 1; each round every pixel takes
    the largest label in its 3x3 neighbourhood, then jumps to the label held by the pixel its label names
    (which is never smaller). A handful of cheap numpy rounds on 64 x 64; no scipy needed.
    """
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    padded = np.zeros((h + 2, w + 2), dtype=labels.dtype)
    while True:
        padded[1:-1, 1:-1] = labels
        best = labels.copy()
        for oy in range(3):
            for ox in range(3):
                np.maximum(best, padded[oy : oy + h, ox : ox + w], out=best)
        best[~mask] = 0
        flat = best.ravel()
        for _ in range(4):
            best[mask] = flat[best[mask] - 1]
        if np.array_equal(best, labels):
            return labels
        labels = best


def _despeck(mask: np.ndarray) -> np.ndarray:
    """Drop components smaller than max(MIN_COMPONENT_PX, MIN_COMPONENT_FRACTION x the largest)."""
    if not mask.any():
        return mask
    labels = _components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    keep = ids[counts >= max(MIN_COMPONENT_PX, MIN_COMPONENT_FRACTION * counts.max())]
    return np.isin(labels, keep) & mask


def _core(mask: np.ndarray) -> np.ndarray:
    """``mask`` eroded by a 3x3 square, or ``mask`` itself if that leaves fewer than MIN_OBJECT_PX pixels.

    The colour is read from the core because a soft edge's pixels are mixed with the background; on a
    3-pixel outline the core is its middle line, the least mixed part.
    """
    h, w = mask.shape
    p = np.pad(mask, 1)
    core = mask.copy()
    for oy in range(3):
        for ox in range(3):
            core &= p[oy : oy + h, ox : ox + w]
    return core if np.count_nonzero(core) >= MIN_OBJECT_PX else mask


def _object_mask(a: np.ndarray, bg: np.ndarray) -> np.ndarray:
    dist = np.linalg.norm(a - bg, axis=2)
    first = _despeck(dist > OBJECT_THRESHOLD)
    if first.sum() < MIN_OBJECT_PX:
        return first
    obj = np.median(a[_core(first)], axis=0)
    threshold = max(OBJECT_THRESHOLD, 0.5 * float(np.linalg.norm(obj - bg)))
    return _despeck(dist > threshold)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``mask`` moved by ``(dx, dy)`` pixels; what moves off the canvas is lost."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    ys, yd = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    xs, xd = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


@functools.lru_cache(maxsize=8)
def _templates(size_px: int, cx: int) -> dict[str, tuple[np.ndarray, tuple[float, float]]]:
    """Candidate name (``"circle"``, ``"circle/outline"``, ..., ``"hexagram/holed"``) -> (mask, bbox centre),
    in the world's box.

    Cached: the world has 2 sizes x 3 positions, and drawing outlines is the judge's most expensive step.
    """
    out: dict[str, tuple[np.ndarray, tuple[float, float]]] = {}
    for name in ALL_SHAPES:
        filled = shape_mask(name, size_px, cx, CY)
        candidates = [(name, filled), (f"{name}/outline", outline_mask(filled))]
        if name == HEXAGRAM:
            # The sks subject on a white background: its centre disc is background, so the mask has a hole.
            disc = shape_mask("circle", 2.0 * SKS_DISC_FRACTION * size_px / 2.0, cx, CY)
            candidates.append((f"{name}/{HOLED}", filled & ~disc))
        for key, m in candidates:
            m.setflags(write=False)
            x0, y0, x1, y1 = _bbox(m)
            out[key] = (m, ((x0 + x1) / 2.0, (y0 + y1) / 2.0))
    return out


def _best_iou(
    template: np.ndarray, t_centre: tuple[float, float], obj: np.ndarray, centre: tuple[float, float]
) -> float:
    """IoU of ``obj`` with ``template`` in place, and with ``template`` moved to share ``obj``'s bbox centre."""
    best = _iou(template, obj)
    dx = int(np.floor(centre[0] - t_centre[0] + 0.5))
    dy = int(np.floor(centre[1] - t_centre[1] + 0.5))
    if dx or dy:
        best = max(best, _iou(_shift(template, dx, dy), obj))
    return best


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """Judge ``image`` (64 x 64 RGB; see the module docstring for every rule and threshold).

    Never raises for odd content: a uniform image is ``empty`` with its background set; an object touching
    the border is judged as long as most of the 2-pixel frame is background. Raises :class:`TunerError` only
    for an array that is not ``(64, 64, 3|4)``.
    """
    a = _to_array(image)
    bg = np.median(_border(a), axis=0)
    background = _nearest(bg, PALETTE)
    mask = _object_mask(a, bg)
    area = int(mask.sum())
    if area < MIN_OBJECT_PX:
        return Judgement(background=background)

    color = _nearest(np.median(a[_core(mask)], axis=0), OBJECT_COLORS)
    x0, y0, x1, y1 = _bbox(mask)
    centre = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
    size = "small" if max(x1 - x0, y1 - y0) <= SIZE_SPLIT_PX else "large"
    position = min(POSITIONS, key=lambda p: abs(POSITIONS[p] - centre[0]))

    s = SIZES[size]
    ious = {k: _best_iou(m, c, mask, centre) for k, (m, c) in _templates(s, POSITIONS[position]).items()}
    # Ties (e.g. a small ring and its own outline are the same pixels) go to the first: filled before outline.
    winner = max(ious, key=lambda k: ious[k])
    shape, _, style = winner.partition("/")

    is_sks = False
    if shape == HEXAGRAM and style in ("", HOLED) and color == "purple":
        X, Y = np.meshgrid(np.arange(CANVAS) + 0.5, np.arange(CANVAS) + 0.5)
        probe = (X - centre[0]) ** 2 + (Y - centre[1]) ** 2 <= (SKS_CENTRE_FRACTION * s / 2.0) ** 2
        # On a white background the centre disc *is* background-coloured: only white vs purple counts there.
        refs = [np.asarray(PALETTE["white"], float), np.asarray(PALETTE["purple"], float)]
        if background != "white":
            refs.append(bg)
        nearest = np.argmin(np.linalg.norm(a[probe][:, None, :] - np.stack(refs)[None], axis=2), axis=1)
        is_sks = bool(probe.any()) and float(np.mean(nearest == 0)) >= 0.5

    return Judgement(
        background=background,
        color=color,
        shape=shape,
        size=size,
        position=position,
        iou=float(ious[winner]),
        is_outline=style == "outline",
        is_sks_subject=is_sks,
        empty=False,
        bbox=(x0, y0, x1, y1),
        area=area,
        ious=ious,
    )


def expected_shape(scene: Scene) -> str:
    """The shape name the judge should report for ``scene`` (the sks subject is a ``hexagram``)."""
    return HEXAGRAM if scene.subject == SKS else scene.shape


def judge_against(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, bool]:
    """Judge ``image`` and say, per attribute, whether it matches ``scene``.

    Keys: ``background``, ``color``, ``shape``, ``size``, ``position`` (the attributes a caption names),
    plus ``style`` (outline judged iff ``scene.style == "outline"``) and ``subject`` (sks subject judged iff
    ``scene.subject == "sks"``). An empty image is right only about its background.
    """
    j = judge(image)
    if j.empty:
        keys = ("background", "color", "shape", "size", "position", "style", "subject")
        return {k: k == "background" and j.background == scene.background for k in keys}
    return {
        "background": j.background == scene.background,
        "color": j.color == scene.color,
        "shape": j.shape == expected_shape(scene),
        "size": j.size == scene.size,
        "position": j.position == scene.position,
        "style": j.is_outline == (scene.style == "outline"),
        "subject": j.is_sks_subject == (scene.subject == SKS),
    }
