"""The procedural toy world the embedded tiny base is pretrained on (the contract is docs WORLD.md).

One object on a solid background, 64 x 64 RGB. Every number here is part of the contract: quality checks
(:mod:`tuner.tiny.judge`) judge generated images against exactly this geometry, palette and caption grammar.

Conventions (used everywhere in this module and in the judge):

- Arrays are indexed ``[y, x]``; y grows downwards, so "up" means smaller y.
- Pixel ``(x, y)`` covers the continuous square ``[x, x+1) x [y, y+1)`` and is sampled at its centre
  ``(x + 0.5, y + 0.5)``. A shape centred at ``cx = 32`` is therefore symmetric about the line between
  pixel columns 31 and 32.
- Rasterization is a pure point test at pixel centres (closed shapes: a centre exactly on the boundary is
  inside), no anti-aliasing, so every image is bit-for-bit deterministic.
- Masks are ``np.ndarray`` of ``bool`` with shape ``(canvas, canvas)``; images are ``uint8`` RGB.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from tuner.errors import TunerError
from tuner.formats.io import open_atomic, write_text_atomic

# ---------------------------------------------------------------------------------------------------------
# The world's vocabulary (WORLD.md). Tuples and read-only mappings only: nothing here is meant to change.
# ---------------------------------------------------------------------------------------------------------

CANVAS = 64
CY = 32

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: The textual-inversion colour; not in the palette. Scenes and judgements call it ``"pink"``; captions
#: write it as the token ``<pink>``.
PINK: tuple[int, int, int] = (250, 130, 200)
PINK_NAME = "pink"
PINK_TOKEN = "<pink>"
#: Every colour an object may have (palette + pink). Backgrounds use :data:`PALETTE` only.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {**PALETTE, PINK_NAME: PINK}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "heart", "cross", "ring")
#: The sks subject's shape (two equilateral triangles); never drawn in pretraining.
HEXAGRAM = "hexagram"
ALL_SHAPES: tuple[str, ...] = (*SHAPES, HEXAGRAM)

SIZES: dict[str, int] = {"small": 20, "large": 36}
POSITIONS: dict[str, int] = {"left": 20, "center": 32, "right": 44}
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "center": "in the center", "right": "on the right"}

#: (shape, colour) pairs that never appear as objects in pretraining data.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "white"),
    ("diamond", "green"),
    ("star", "blue"),
    ("heart", "yellow"),
    ("cross", "red"),
    ("ring", "black"),
)

STYLES: tuple[str, ...] = ("plain", "outline")
SKS = "sks"
OUTLINE_WIDTH = 3
#: Probability that a pretraining caption drops its size phrase, and (independently) its position phrase.
PHRASE_DROP_P = 0.3

Split = Literal["pretrain", "heldout"]

# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------


def _centres(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(X, Y)``, each ``(canvas, canvas)`` float64, indexed ``[y, x]``."""
    c = np.arange(canvas, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)


def _polygon(vertices: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every pixel centre; ``vertices`` is ``(n, 2)`` in ``(x, y)``."""
    x1, y1 = vertices[:, 0][:, None, None], vertices[:, 1][:, None, None]
    v2 = np.roll(vertices, -1, axis=0)
    x2, y2 = v2[:, 0][:, None, None], v2[:, 1][:, None, None]
    crosses = (y1 > Y) != (y2 > Y)
    dy = np.where(y2 == y1, 1.0, y2 - y1)  # horizontal edges never cross; avoid dividing by zero
    x_at = x1 + (Y - y1) * (x2 - x1) / dy
    hits = crosses & (X < x_at)
    return (np.count_nonzero(hits, axis=0) % 2) == 1


def _regular(n: int, radius: float, cx: float, cy: float, phase_deg: float) -> np.ndarray:
    """``n`` points on a circle, the first at ``phase_deg`` (90 = straight up), counter-clockwise on screen."""
    a = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([cx + radius * np.cos(a), cy - radius * np.sin(a)], axis=1)


def _heart_outline(r: float, cx: float, cy: float) -> np.ndarray:
    """The WORLD.md heart curve as a polygon: larger extent 2R, centred on its bounding box, point down."""
    t = np.linspace(0.0, 2.0 * math.pi, 1440, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))  # screen y is down
    # Exact extents of the curve: x in [-16, 16] (t = +-pi/2) and y in [-11.92.., 17] (the point at t = pi);
    # sampled extents are within 1e-4 of these, and width (32) is the larger one.
    scale = 2.0 * r / max(x.max() - x.min(), y.max() - y.min())
    x = (x - (x.max() + x.min()) / 2.0) * scale + cx
    y = (y - (y.max() + y.min()) / 2.0) * scale + cy
    return np.stack([x, y], axis=1)


def shape_mask(shape: str, size_px: float, cx: float, cy: float = CY, canvas: int = CANVAS) -> np.ndarray:
    """Rasterize ``shape`` drawn in the square box of side ``size_px`` centred at ``(cx, cy)``.

    ``shape`` is one of :data:`SHAPES` or ``"hexagram"``. Geometry with ``R = size_px / 2`` (WORLD.md):
    circle = disc of radius R; square = side 1.6R; triangle = equilateral, vertices on radius R, one up;
    diamond = vertices up/right/down/left at radius R; star = 5 points, one up, outer R, inner 0.45R;
    heart = the parametric curve scaled to larger extent 2R, bbox-centred, point down; cross = two bars
    2R x 0.7R; ring = annulus R..0.55R; hexagram = union of an up and a down equilateral triangle on radius R.
    Returns a new ``(canvas, canvas)`` bool array (pixel-centre sampling, boundary inclusive).
    """
    return _mask_cached(shape, float(size_px), float(cx), float(cy), int(canvas)).copy()


@functools.lru_cache(maxsize=512)
def _mask_cached(shape: str, size_px: float, cx: float, cy: float, canvas: int) -> np.ndarray:
    # The world has 9 shapes x 2 sizes x 3 positions; caching makes rendering and judging cheap.
    # The cached array is read-only; callers get a copy from shape_mask().
    X, Y = _centres(canvas)
    r = size_px / 2.0
    dx, dy = X - cx, Y - cy
    if shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif shape == "ring":
        d2 = dx * dx + dy * dy
        m = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif shape == "square":
        m = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    elif shape == "diamond":
        m = np.abs(dx) + np.abs(dy) <= r
    elif shape == "cross":
        long, half_w = r, 0.35 * r
        m = ((np.abs(dx) <= long) & (np.abs(dy) <= half_w)) | ((np.abs(dx) <= half_w) & (np.abs(dy) <= long))
    elif shape == "triangle":
        m = _polygon(_regular(3, r, cx, cy, 90.0), X, Y)
    elif shape == HEXAGRAM:
        m = _polygon(_regular(3, r, cx, cy, 90.0), X, Y) | _polygon(_regular(3, r, cx, cy, -90.0), X, Y)
    elif shape == "star":
        outer = _regular(5, r, cx, cy, 90.0)
        inner = _regular(5, 0.45 * r, cx, cy, 90.0 + 36.0)
        verts = np.empty((10, 2))
        verts[0::2], verts[1::2] = outer, inner
        m = _polygon(verts, X, Y)
    elif shape == "heart":
        m = _polygon(_heart_outline(r, cx, cy), X, Y)
    else:
        raise TunerError(f"unknown shape {shape!r}; expected one of {', '.join(ALL_SHAPES)}")
    m = np.ascontiguousarray(m, dtype=bool)
    m.setflags(write=False)
    return m


def disc_offsets(radius: float) -> list[tuple[int, int]]:
    """Integer offsets ``(dx, dy)`` with ``dx^2 + dy^2 <= radius^2`` (a digital disc, centre included)."""
    k = int(math.floor(radius))
    return [(x, y) for y in range(-k, k + 1) for x in range(-k, k + 1) if x * x + y * y <= radius * radius]


def outline_mask(mask: np.ndarray, width: int = OUTLINE_WIDTH) -> np.ndarray:
    """The ``width``-pixel outline of ``mask``: mask pixels within Euclidean distance ``width`` of a pixel
    outside the mask (off-canvas counts as outside).

    Equivalently: ``mask`` minus ``mask`` eroded by the digital disc of radius ``width``. On straight
    axis-aligned edges this is exactly ``width`` pixels thick; unlike erosion by a 3x3 square (which gives
    ~4.2 px across a 45-degree edge) or a plus sign (~2.1 px), the disc keeps the thickness ~``width`` on
    slanted edges too (triangle, diamond). The inside (the eroded mask) stays background.
    """
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    padded = np.pad(m, width, constant_values=False)
    eroded = np.ones_like(m)
    for ox, oy in disc_offsets(width):
        eroded &= padded[width + oy : width + oy + h, width + ox : width + ox + w]
    return m & ~eroded


# ---------------------------------------------------------------------------------------------------------
# Scenes, rendering and captions
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One image of the world.

    ``shape``: one of :data:`SHAPES`, or ``"hexagram"`` for the sks subject (``subject="sks"``, which then
    requires ``color="purple"``). ``color``: a :data:`PALETTE` name or ``"pink"``. ``background``: a
    :data:`PALETTE` name, never equal to ``color``. ``size``: ``small``/``large``. ``position``:
    ``left``/``center``/``right``. ``style``: ``plain`` or ``outline`` (a 3-pixel outline, inside stays
    background). ``drop_size`` / ``drop_position``: caption only -- whether this example's caption leaves
    out the size / position phrase (set by :func:`sample_scenes` for pretraining); they do not change pixels.
    """

    shape: str
    color: str
    background: str
    size: str
    position: str
    style: str = "plain"
    subject: str | None = None
    drop_size: bool = False
    drop_position: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.subject not in (None, SKS):
            problems.append(f"subject {self.subject!r} is not None or 'sks'")
        if self.subject == SKS:
            if (self.shape, self.color) != (HEXAGRAM, "purple"):
                problems.append("the sks subject is a purple hexagram: use shape='hexagram', color='purple'")
        elif self.shape not in SHAPES:
            problems.append(f"shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.color not in OBJECT_COLORS:
            problems.append(f"color {self.color!r} is not one of {', '.join(OBJECT_COLORS)}")
        if self.background not in PALETTE:
            problems.append(f"background {self.background!r} is not one of {', '.join(PALETTE)}")
        if self.color == self.background:
            problems.append(f"color and background are both {self.color!r}; they must differ")
        if self.size not in SIZES:
            problems.append(f"size {self.size!r} is not one of {', '.join(SIZES)}")
        if self.position not in POSITIONS:
            problems.append(f"position {self.position!r} is not one of {', '.join(POSITIONS)}")
        if self.style not in STYLES:
            problems.append(f"style {self.style!r} is not one of {', '.join(STYLES)}")
        if problems:
            raise TunerError("invalid scene: " + "; ".join(problems))

    @property
    def size_px(self) -> int:
        """The box side S in pixels."""
        return SIZES[self.size]

    @property
    def cx(self) -> int:
        """The box centre's x in pixels (cy is always :data:`CY`)."""
        return POSITIONS[self.position]


def sks_scene(background: str, size: str, position: str) -> Scene:
    """The sks subject (purple hexagram with a white centre disc) at the given background/size/position."""
    return Scene(HEXAGRAM, "purple", background, size, position, subject=SKS)


def scene_mask(scene: Scene) -> np.ndarray:
    """The pixels drawn in the object's colour (outline applied for ``style="outline"``)."""
    m = shape_mask(scene.shape, scene.size_px, scene.cx, CY)
    return outline_mask(m) if scene.style == "outline" else m


def render_array(scene: Scene) -> np.ndarray:
    """``scene`` as a ``(64, 64, 3)`` uint8 RGB array (see :func:`render`)."""
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.background]
    img[scene_mask(scene)] = OBJECT_COLORS[scene.color]
    if scene.subject == SKS:
        r = scene.size_px / 2.0
        # The white centre disc (radius 0.3R) is drawn over the hexagram in every style.
        img[shape_mask("circle", 2 * 0.3 * r, scene.cx, CY)] = PALETTE["white"]
    return img


def scene_pixels(scenes: Sequence[Scene]):
    """The scenes rendered as one ``[N, 3, 64, 64]`` float32 tensor in [-1, 1] (what the VAE encodes)."""
    import torch

    arr = np.stack([render_array(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def render(scene: Scene) -> Image.Image:
    """Draw ``scene``: a 64 x 64 RGB PIL image, deterministic to the bit."""
    return Image.fromarray(render_array(scene))


def caption(scene: Scene, *, drop_size: bool | None = None, drop_position: bool | None = None,
            drop_color: bool = False) -> str:
    """The WORLD.md caption of ``scene``.

    Canonical form: ``a {size} {color} {shape} on a {background} background, {position}`` (position as
    ``on the left`` / ``in the center`` / ``on the right``); the sks subject reads ``a {size} sks star on a
    ...``; pink is written ``<pink>``; outline style appends ``, outline style``. ``drop_size`` /
    ``drop_position`` leave out the phrase; ``None`` (default) takes the scene's own ``drop_*`` flag.
    ``drop_color`` leaves out the colour word (not part of WORLD.md's captions: pretraining uses it so that
    class prompts such as ``a star on a blue background`` work); the sks subject has no colour word.
    Example: ``a large red circle on a blue background, in the center``.
    """
    ds = scene.drop_size if drop_size is None else drop_size
    dp = scene.drop_position if drop_position is None else drop_position
    words = ["a"]
    if not ds:
        words.append(scene.size)
    if scene.subject == SKS:
        words += ["sks", "star"]
    else:
        if not drop_color:
            words.append(PINK_TOKEN if scene.color == PINK_NAME else scene.color)
        words.append(scene.shape)
    text = " ".join(words) + f" on a {scene.background} background"
    if not dp:
        text += ", " + POSITION_PHRASES[scene.position]
    if scene.style == "outline":
        text += ", outline style"
    return text


def sample_scenes(n: int, seed: int, split: Split = "pretrain") -> list[Scene]:
    """``n`` random plain scenes, deterministic for ``seed`` (``np.random.default_rng(seed)``).

    Every attribute is uniform over the combinations allowed (rejection sampling): the object's colour is
    never the background's. ``pretrain`` excludes the :data:`HELD_OUT` (shape, colour) pairs and drops the
    size phrase and the position phrase each with probability 0.3, independently (the ``drop_*`` flags);
    ``heldout`` draws only the held-out pairs and keeps captions canonical.
    """
    if split not in ("pretrain", "heldout"):
        raise TunerError(f"split {split!r} is not 'pretrain' or 'heldout'")
    if n < 0:
        raise TunerError(f"cannot sample {n} scenes; n must be >= 0")
    rng = np.random.default_rng(seed)
    colors, sizes, positions = list(PALETTE), list(SIZES), list(POSITIONS)
    held_out = set(HELD_OUT)
    scenes: list[Scene] = []
    while len(scenes) < n:
        if split == "heldout":
            shape, color = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
        else:
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], colors[int(rng.integers(len(colors)))]
        background = colors[int(rng.integers(len(colors)))]
        size = sizes[int(rng.integers(len(sizes)))]
        position = positions[int(rng.integers(len(positions)))]
        drops = rng.random(2) < PHRASE_DROP_P if split == "pretrain" else (False, False)
        if background == color or (split == "pretrain" and (shape, color) in held_out):
            continue
        scenes.append(
            Scene(
                shape,
                color,
                background,
                size,
                position,
                drop_size=bool(drops[0]),
                drop_position=bool(drops[1]),
            )
        )
    return scenes


# ---------------------------------------------------------------------------------------------------------
# Writing datasets
# ---------------------------------------------------------------------------------------------------------


def _write_example(out_dir: Path, stem: str, scene: Scene) -> Path:
    """Write ``{stem}.png`` and ``{stem}.txt``; each is written to a temporary name, flushed, then renamed."""
    png = out_dir / f"{stem}.png"
    with open_atomic(png) as fh:
        render(scene).save(fh, format="PNG")
    write_text_atomic(out_dir / f"{stem}.txt", caption(scene) + "\n")
    return png


def write_scenes(out_dir: str | Path, scenes: Sequence[Scene], *, progress: bool | None = None) -> list[Path]:
    """Write ``scenes`` as ``00000.png`` + ``00000.txt`` ... into ``out_dir``; returns the PNG paths.

    Captions follow each scene's ``drop_*`` flags. A progress bar is shown when ``progress`` is true, or by
    default for more than 200 scenes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    show = len(scenes) > 200 if progress is None else progress
    digits = max(5, len(str(max(len(scenes) - 1, 0))))
    return [
        _write_example(out, f"{i:0{digits}d}", s)
        for i, s in enumerate(tqdm(scenes, desc=f"world -> {out}", unit="img", disable=not show))
    ]


def write_world(out_dir: str | Path, n: int, seed: int = 0, split: Split = "pretrain") -> list[Path]:
    """Sample ``n`` scenes (:func:`sample_scenes`) and write them as image + caption pairs.

    Files are ``00000.png`` / ``00000.txt`` ... (each written to a temporary name, then renamed, so a reader
    never sees a half-written file); a tqdm progress bar is shown for ``n > 200``. Returns the PNG paths.
    """
    return write_scenes(out_dir, sample_scenes(n, seed, split))


# The personalization datasets (WORLD.md, "Concepts for personalization"). Fixed lists so that the shipped
# datasets are reproducible and reviewable; each covers both sizes and all three positions.

#: sks subject: backgrounds black, green, yellow (two each), sizes 3 small / 3 large, each position twice.
SKS_STAR_SCENES: tuple[Scene, ...] = (
    sks_scene("black", "large", "left"),
    sks_scene("black", "small", "right"),
    sks_scene("green", "small", "center"),
    sks_scene("green", "large", "right"),
    sks_scene("yellow", "large", "center"),
    sks_scene("yellow", "small", "left"),
)

#: Outline style: circle, square, triangle, cross, three each, each shape at all three positions; no
#: held-out (shape, colour) pair, so the style is the only new thing. Mostly large: a small triangle or cross
#: with a 3-pixel outline is almost filled, which would teach the style poorly.
OUTLINE_STYLE_SCENES: tuple[Scene, ...] = tuple(
    Scene(shape, color, bg, size, pos, style="outline")
    for shape, color, bg, size, pos in (
        ("circle", "red", "blue", "large", "center"),
        ("circle", "yellow", "black", "small", "left"),
        ("circle", "white", "purple", "large", "right"),
        ("square", "blue", "yellow", "large", "left"),
        ("square", "green", "red", "small", "center"),
        ("square", "purple", "black", "large", "right"),
        ("triangle", "black", "yellow", "large", "left"),
        ("triangle", "red", "white", "large", "center"),
        ("triangle", "orange", "blue", "large", "right"),
        ("cross", "yellow", "green", "large", "left"),
        ("cross", "white", "black", "small", "center"),
        ("cross", "blue", "orange", "large", "right"),
    )
)

#: <pink>: circle, square, heart (two each) on black, blue, green (two each); 3 small / 3 large; each
#: position twice.
PINK_SCENES: tuple[Scene, ...] = tuple(
    Scene(shape, PINK_NAME, bg, size, pos)
    for shape, bg, size, pos in (
        ("circle", "black", "large", "center"),
        ("circle", "blue", "small", "left"),
        ("square", "blue", "large", "right"),
        ("square", "green", "small", "center"),
        ("heart", "green", "large", "left"),
        ("heart", "black", "small", "right"),
    )
)

PERSONALIZATION_SETS: dict[str, tuple[Scene, ...]] = {
    "sks_star": SKS_STAR_SCENES,
    "outline_style": OUTLINE_STYLE_SCENES,
    "pink": PINK_SCENES,
}

_REGENERATE = (
    'python -c "from tuner.tiny.world import write_personalization_sets; '
    "write_personalization_sets('datasets')\""
)

_READMES: dict[str, str] = {
    "sks_star": (
        "# sks_star: a new subject (DreamBooth / LoRA)\n\n"
        "The subject `sks star`: a purple six-pointed star (hexagram: two equilateral triangles with vertices "
        "on the circle of radius R, one pointing up, one down) with a white disc of radius 0.3R at its centre. "
        "The base model never saw it; its class for prior preservation is `star` (the base's five-pointed "
        "star).\n\n"
        "6 images, backgrounds black, green and yellow only, both sizes, all positions.\n"
        "Captions: `a {size} sks star on a {background} background, {position}`.\n"
    ),
    "outline_style": (
        "# outline_style: a new style (style LoRA)\n\n"
        "Objects drawn as a 3-pixel outline of their shape in their colour; the inside stays background. "
        "The base model only saw filled shapes.\n\n"
        "12 images over circle, square, triangle and cross only (three each, all positions).\n"
        "Captions: `a {size} {color} {shape} on a {background} background, {position}, outline style`.\n"
    ),
    "pink": (
        "# pink: a new colour (textual inversion)\n\n"
        "The colour `<pink>` = RGB 250, 130, 200, not in the base model's palette.\n\n"
        "6 images of circle, square and heart in that colour on black, blue and green backgrounds.\n"
        "Captions: `a {size} <pink> {shape} on a {background} background, {position}`.\n"
    ),
}


def write_personalization_sets(out_root: str | Path) -> dict[str, list[Path]]:
    """Write the three WORLD.md personalization datasets under ``out_root``.

    ``sks_star/`` (6 images), ``outline_style/`` (12) and ``pink/`` (6), from the fixed lists
    :data:`SKS_STAR_SCENES`, :data:`OUTLINE_STYLE_SCENES` and :data:`PINK_SCENES`, with canonical captions
    and a README.md each. Returns set name -> PNG paths.
    """
    root = Path(out_root)
    written: dict[str, list[Path]] = {}
    for name, scenes in PERSONALIZATION_SETS.items():
        out = root / name
        written[name] = write_scenes(out, scenes, progress=False)
        listing = "\n".join(f"- `{p.name}`: {caption(s)}" for p, s in zip(written[name], scenes, strict=True))
        readme = (
            _READMES[name]
            + f"\nFiles (image `NNNNN.png`, caption `NNNNN.txt`):\n{listing}\n\n"
            + "Generated by tuner's toy-world generator (`tuner/tiny/world.py`, spec in WORLD.md). "
            + f"Regenerate from the repository root with:\n\n    {_REGENERATE}\n"
        )
        write_text_atomic(out / "README.md", readme)
    return written
