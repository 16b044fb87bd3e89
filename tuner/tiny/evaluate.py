"""Quality checks from pixels: generate images for prompts whose scene is known, judge them, count (WORLD.md).

Every mode builds a list of :class:`EvalCase` (a prompt, a seed, and per metric the value the judge should
read back), generates one image per case with :func:`tuner.sample.sampler.sample_images`, judges each image
with :func:`tuner.tiny.judge.judge` (pixels only: the judge never sees the prompt) and reports, per metric,
the fraction of images judged right. The modes:

====================  ========================================================  ===========================
function              prompts                                                   metrics
====================  ========================================================  ===========================
:func:`eval_base`     random world scenes, canonical full captions; split       background, color, shape,
                      ``seen`` (the pretraining distribution) or ``heldout``    size, position
                      (the (shape, colour) pairs pretraining never showed)
:func:`eval_subject`  ``a {size} sks star on a {bg} background, {position}``    subject, background
:func:`eval_prior`    ``a star on a {bg} background``                           star, background
:func:`eval_style`    ``a large {color} {shape} on a {bg} background,           outline, shape, color
                      {position}, outline style``, all 8 shapes
:func:`eval_color`    ``a {size} <pink> {shape} on a {bg} background,           color, shape
                      {position}``
====================  ========================================================  ===========================

Prompts are written with :func:`tuner.tiny.world.caption`, so they follow the training captions' grammar to
the letter (``on a orange background`` included). Seeds are explicit and every scene choice is seeded, so the
same call gives the same prompts and seeds; run the same mode on a base with and without an adapter to
compare them image for image (:func:`compare`).

Settings default to ``SampleSettings()``: DDIM, 25 steps, CFG 5. On a randomly initialised base every number
is near chance; that measures nothing but shows the machinery works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from tuner.errors import TunerError
from tuner.models.base import BaseModel
from tuner.sample.sampler import SampleSettings, sample_images, to_pil
from tuner.tiny.judge import Judgement, expected_shape, judge
from tuner.tiny.world import (
    HELD_OUT,
    PALETTE,
    PINK_NAME,
    PINK_SCENES,
    PINK_TOKEN,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption,
    sample_scenes,
    scene_pixels,
    sks_scene,
)

EVAL_MODES: tuple[str, ...] = ("base", "heldout", "subject", "prior", "style", "color")
#: Backgrounds of the subject and prior checks: the sks training set has black, green and yellow only, so
#: these are all new to the subject (white is the hard one: the subject's centre disc is white).
EVAL_BACKGROUNDS: tuple[str, ...] = ("blue", "red", "orange", "white")
#: Shapes of the outline-style training set, and the shapes it never showed.
STYLE_TRAINED_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
STYLE_NEW_SHAPES: tuple[str, ...] = ("diamond", "star", "heart", "ring")
COLOR_SHAPES: tuple[str, ...] = ("circle", "square", "heart", "star", "diamond")
_PINK_TRAINED_SHAPES = frozenset(s.shape for s in PINK_SCENES)

#: Metric name -> the :class:`~tuner.tiny.judge.Judgement` field it reads. A case's expected value for the
#: metric is compared with that field for equality; an empty judgement has ``None`` / ``False`` object fields,
#: so it is right about nothing but (possibly) its background.
METRIC_FIELDS: dict[str, str] = {
    "background": "background",
    "color": "color",
    "shape": "shape",
    "size": "size",
    "position": "position",
    "outline": "is_outline",
    "subject": "is_sks_subject",
    "star": "shape",
}
_JUDGED_FIELDS = ("background", "color", "shape", "size", "position", "is_outline", "is_sks_subject", "empty")
_CHUNK = 4  # images per sample_images call: only sets how often the progress bar moves

Expected = str | bool


@dataclass(frozen=True)
class EvalCase:
    """One image to generate and judge.

    ``expected``: metric name (a key of :data:`METRIC_FIELDS`) -> the value the judge should read back, e.g.
    ``{"background": "blue", "subject": True}``. ``group``: a label for the report's per-group rows (e.g. the
    background); ``""`` for none.
    """

    prompt: str
    seed: int
    expected: dict[str, Expected]
    group: str = ""
    scene: Scene | None = None
    """The scene the prompt describes, when there is one (:func:`scene_case`): its rendering, passed
    through the base's VAE, gives the report's ceiling."""


@dataclass
class EvalRow:
    """One judged image: its case, what the judge read (``judged``: the :class:`Judgement` fields
    background, color, shape, size, position, is_outline, is_sks_subject, empty, plus iou) and, per metric,
    whether that was right (``correct``)."""

    prompt: str
    seed: int
    group: str
    expected: dict[str, Expected]
    judged: dict[str, Any]
    correct: dict[str, bool]


@dataclass
class EvalReport:
    """What a quality check measured.

    ``mode``: one of :data:`EVAL_MODES` (or a caller's own name for :func:`evaluate_cases`). ``n``: images.
    ``accuracy``: metric -> fraction of images judged right, over all images. ``by_group``: group label ->
    metric -> fraction, for the cases that have a group. ``settings``: the sampler settings (``steps``,
    ``cfg``, ``sampler``, ``width``, ``height``, ``negative``) and ``seeds`` (the distinct seeds used).
    ``rows``: one :class:`EvalRow` per image, in case order. ``ceiling`` (empty when some case has no
    scene): metric -> fraction judged right on the VAE's round trip (encode, decode) of each case's target
    scene, overall and (``ceiling_by_group``) per group: the most a generated latent that encodes the
    right image could score, since every image is judged after this VAE's decoder.
    """

    mode: str
    n: int
    metrics: tuple[str, ...]
    accuracy: dict[str, float]
    by_group: dict[str, dict[str, float]]
    settings: dict[str, Any]
    rows: list[EvalRow] = field(default_factory=list)
    ceiling: dict[str, float] = field(default_factory=dict)
    ceiling_by_group: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain str / int / float / bool / list / dict only)."""
        out = asdict(self)
        out["metrics"] = list(self.metrics)
        return out

    def format_table(self) -> str:
        """A readable table: one row per group (when there are groups) and an ``all`` row; one column per
        metric, in percent."""
        s = self.settings
        seeds = s.get("seeds", [])
        contiguous = len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1))
        seed_text = f"{seeds[0]}..{seeds[-1]}" if contiguous else ", ".join(map(str, seeds))
        lines = [
            f"eval {self.mode}: {self.n} images | {s.get('sampler')}, {s.get('steps')} steps, "
            f"cfg {s.get('cfg')} | seeds {seed_text}"
        ]
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.group] = counts.get(row.group, 0) + 1
        table = [(g, counts.get(g, 0), acc) for g, acc in self.by_group.items()] + [
            ("all", self.n, self.accuracy)
        ]
        width = max(len("group"), *(len(g) for g, _, _ in table))
        cols = [max(len(m), 6) for m in self.metrics]
        lines.append(
            f"{'group':<{width}}  {'n':>4}  " + "  ".join(f"{m:>{w}}" for m, w in zip(self.metrics, cols))
        )
        for g, n, acc in table:
            cells = "  ".join(f"{100.0 * acc[m]:>{w - 1}.1f}%" for m, w in zip(self.metrics, cols))
            lines.append(f"{g:<{width}}  {n:>4}  {cells}")
        if self.ceiling:
            lines.append("VAE ceiling (the target scenes through the base's VAE, judged the same way):")
            for g, acc in [*self.ceiling_by_group.items(), ("all", self.ceiling)]:
                cells = "  ".join(f"{100.0 * acc[m]:>{w - 1}.1f}%" for m, w in zip(self.metrics, cols))
                lines.append(f"{g:<{width}}  {'':>4}  {cells}")
        return "\n".join(lines)


@dataclass
class Comparison:
    """The same check run without and with an adapter (same prompts and seeds).

    ``drop``: metric -> ``without - with`` accuracy (positive: the adapter made it worse), e.g. how much of
    the class prior a subject LoRA destroyed.
    """

    without: EvalReport
    with_adapter: EvalReport
    drop: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with both reports and the drop."""
        return {
            "without": self.without.to_dict(),
            "with": self.with_adapter.to_dict(),
            "drop": dict(self.drop),
        }

    def format_table(self) -> str:
        """Both tables, then one row per metric: accuracy without, with, and the drop in percentage points."""
        lines = [
            "without adapter:",
            self.without.format_table(),
            "",
            "with adapter:",
            self.with_adapter.format_table(),
        ]
        lines += ["", f"{'metric':<12}  {'without':>8}  {'with':>8}  {'drop':>9}"]
        for m, d in self.drop.items():
            a, b = self.without.accuracy[m], self.with_adapter.accuracy[m]
            lines.append(f"{m:<12}  {100 * a:>7.1f}%  {100 * b:>7.1f}%  {100 * d:>+5.1f} pts")
        return "\n".join(lines)


def compare(without: EvalReport, with_adapter: EvalReport) -> Comparison:
    """Pair two reports of the same check; raises :class:`TunerError` if their prompts or seeds differ."""
    key_a = [(r.prompt, r.seed) for r in without.rows]
    key_b = [(r.prompt, r.seed) for r in with_adapter.rows]
    if without.mode != with_adapter.mode or key_a != key_b:
        raise TunerError("cannot compare evaluations of different prompts or seeds")
    drop = {m: without.accuracy[m] - with_adapter.accuracy[m] for m in without.metrics}
    return Comparison(without, with_adapter, drop)


# ---------------------------------------------------------------------------------------------------------
# The machinery
# ---------------------------------------------------------------------------------------------------------


def _judged_fields(j: Judgement) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(j, k) for k in _JUDGED_FIELDS}
    out["iou"] = round(float(j.iou), 4)
    return out


def evaluate_cases(
    base: BaseModel,
    mode: str,
    cases: Sequence[EvalCase],
    settings: SampleSettings | None = None,
    *,
    progress: bool = False,
) -> EvalReport:
    """Generate one image per case (``sample_images``, in case order), judge it, and count.

    Every case must name the same metrics (keys of :data:`METRIC_FIELDS`); the report's metrics keep the
    first case's order. ``settings`` default: ``SampleSettings()`` (DDIM, 25 steps, CFG 5). ``progress``
    shows a tqdm bar on stderr.
    """
    settings = settings or SampleSettings()
    if not cases:
        raise TunerError(f"eval {mode}: nothing to evaluate (0 images)")
    metrics = tuple(cases[0].expected)
    for case in cases:
        unknown = sorted(set(case.expected) - set(METRIC_FIELDS))
        if unknown:
            raise TunerError(
                f"eval {mode}: unknown metric(s) {unknown}; choose from {', '.join(METRIC_FIELDS)}"
            )
        if set(case.expected) != set(metrics):
            raise TunerError(
                f"eval {mode}: case {case.prompt!r} has metrics {sorted(case.expected)}, but the first case "
                f"has {sorted(metrics)}; every case must name the same metrics"
            )
    rows: list[EvalRow] = []
    bar = tqdm(total=len(cases), desc=f"eval {mode}", unit="img", disable=not progress)
    for start in range(0, len(cases), _CHUNK):
        chunk = cases[start : start + _CHUNK]
        images = sample_images(base, [c.prompt for c in chunk], [c.seed for c in chunk], settings)
        for case, image in zip(chunk, images, strict=True):
            j = judge(image)
            correct = {m: getattr(j, METRIC_FIELDS[m]) == case.expected[m] for m in metrics}
            rows.append(
                EvalRow(case.prompt, case.seed, case.group, dict(case.expected), _judged_fields(j), correct)
            )
        bar.update(len(chunk))
    bar.close()

    def accuracy(selected: list[EvalRow]) -> dict[str, float]:
        return {m: float(np.mean([r.correct[m] for r in selected])) for m in metrics}

    groups = list(dict.fromkeys(r.group for r in rows if r.group))
    by_group = {g: accuracy([r for r in rows if r.group == g]) for g in groups}
    ceiling, ceiling_by_group = {}, {}
    if all(c.scene is not None for c in cases):
        right = [
            {m: getattr(j, METRIC_FIELDS[m]) == c.expected[m] for m in metrics}
            for c, j in zip(cases, map(judge, vae_round_trip(base, [c.scene for c in cases])), strict=True)
        ]

        def share(picked: list[int]) -> dict[str, float]:
            return {m: float(np.mean([right[i][m] for i in picked])) for m in metrics}

        ceiling = share(list(range(len(cases))))
        ceiling_by_group = {g: share([i for i, c in enumerate(cases) if c.group == g]) for g in groups}
    summary = {
        "steps": settings.steps,
        "cfg": settings.cfg,
        "sampler": settings.sampler,
        "width": settings.width,
        "height": settings.height,
        "negative": settings.negative,
        "seeds": sorted({c.seed for c in cases}),
    }
    return EvalReport(mode, len(rows), metrics, accuracy(rows), by_group, summary, rows, ceiling, ceiling_by_group)


def vae_round_trip(base: BaseModel, scenes: Sequence[Scene]) -> list[np.ndarray]:
    """Each scene rendered, encoded by the base's VAE (the latent distribution's mean) and decoded, as
    uint8 RGB arrays converted as the sampler converts its images: what the best possible latent for that
    image looks like after decoding."""
    import torch

    vae = base.vae
    first = next(vae.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(scenes), 16):
            x = scene_pixels(scenes[start : start + 16]).to(first.device, first.dtype)
            out += [np.asarray(to_pil(y)) for y in vae.decode(vae.encode(x).latent_dist.mean).sample]
    return out


def scene_case(
    scene: Scene, seed: int, metrics: Sequence[str], *, group: str = "", prompt: str | None = None
) -> EvalCase:
    """A case for ``scene``: its canonical full caption (unless ``prompt`` is given) and, per metric, the
    value the judge reads for a perfect rendering of the scene -- the same comparison as
    :func:`tuner.tiny.judge.judge_against` (``outline`` = the scene's style is outline, ``subject`` = it is
    the sks subject)."""
    values: dict[str, Expected] = {
        "background": scene.background,
        "color": scene.color,
        "shape": expected_shape(scene),
        "size": scene.size,
        "position": scene.position,
        "outline": scene.style == "outline",
        "subject": scene.subject is not None,
    }
    text = prompt if prompt is not None else caption(scene, drop_size=False, drop_position=False)
    return EvalCase(text, seed, {m: values[m] for m in metrics}, group, scene)


def _check_count(name: str, value: int) -> None:
    if value < 1:
        raise TunerError(f"{name} must be >= 1 (got {value})")


def _random_scenes(
    shapes: Sequence[str], per_shape: int, seed: int, make: Callable[[str, str, str, str, str], Scene | None]
) -> list[Scene]:
    """``per_shape`` scenes per shape, colour / background / size / position drawn by ``default_rng(seed)``;
    ``make(shape, color, bg, size, position)`` builds a scene or returns ``None`` to draw again."""
    rng = np.random.default_rng(seed)
    colors, sizes, positions = list(PALETTE), list(SIZES), list(POSITIONS)
    scenes = []
    for shape in shapes:
        for _ in range(per_shape):
            while True:
                pick = [colors[int(rng.integers(len(colors)))] for _ in range(2)]
                size, position = (
                    sizes[int(rng.integers(len(sizes)))],
                    positions[int(rng.integers(len(positions)))],
                )
                scene = make(shape, pick[0], pick[1], size, position)
                if scene is not None:
                    scenes.append(scene)
                    break
    return scenes


# ---------------------------------------------------------------------------------------------------------
# The modes
# ---------------------------------------------------------------------------------------------------------


def eval_base(
    base: BaseModel,
    *,
    split: Literal["seen", "heldout"] = "seen",
    n: int = 200,
    seed: int = 0,
    settings: SampleSettings | None = None,
    progress: bool = False,
) -> EvalReport:
    """How well the base draws what a caption says: ``n`` random scenes (``sample_scenes(n, seed, split)``,
    ``seen`` = the ``pretrain`` split), each prompted with its canonical full caption (no phrase dropped)
    and generated with seed ``seed + i``. Metrics: background, color, shape, size, position.

    ``heldout`` draws only the (shape, colour) pairs pretraining never showed (WORLD.md), so it measures
    composition; its rows are grouped by pair (``purple circle``, ...). Mode name: ``base`` or ``heldout``.
    """
    if split not in ("seen", "heldout"):
        raise TunerError(f"split {split!r} is not 'seen' or 'heldout'")
    _check_count("n", n)
    scenes = sample_scenes(n, seed, "pretrain" if split == "seen" else "heldout")
    metrics = ("background", "color", "shape", "size", "position")
    cases = [
        scene_case(s, seed + i, metrics, group=f"{s.color} {s.shape}" if split == "heldout" else "")
        for i, s in enumerate(scenes)
    ]
    return evaluate_cases(base, "base" if split == "seen" else "heldout", cases, settings, progress=progress)


def eval_subject(
    base: BaseModel,
    *,
    seeds: int = 8,
    seed: int = 0,
    settings: SampleSettings | None = None,
    progress: bool = False,
) -> EvalReport:
    """Is the sks subject drawn on backgrounds its training set never had? Prompts
    ``a {size} sks star on a {bg} background, {position}`` for bg in :data:`EVAL_BACKGROUNDS` x both sizes x
    ``seeds`` seeds (``seed .. seed+seeds-1``, the same for every prompt): ``4 * 2 * seeds`` images.

    The position cycles left, center, right with the seed's index (so 8 seeds give each (bg, size) 3 left,
    3 center, 2 right), covering every position without multiplying the image count by three.
    Metrics: ``subject`` (:attr:`Judgement.is_sks_subject`) and ``background``; rows grouped by background.
    """
    _check_count("seeds", seeds)
    positions = list(POSITIONS)
    cases = [
        scene_case(
            sks_scene(bg, size, positions[k % len(positions)]), seed + k, ("subject", "background"), group=bg
        )
        for bg in EVAL_BACKGROUNDS
        for size in SIZES
        for k in range(seeds)
    ]
    return evaluate_cases(base, "subject", cases, settings, progress=progress)


def eval_prior(
    base: BaseModel,
    *,
    seeds: int = 8,
    seed: int = 0,
    settings: SampleSettings | None = None,
    progress: bool = False,
) -> EvalReport:
    """Does the base still draw the class (the five-pointed ``star``)? Prompts ``a star on a {bg} background``
    for bg in :data:`EVAL_BACKGROUNDS` x ``seeds`` seeds (``seed .. seed+seeds-1``). Metrics: ``star``
    (judged shape is star) and ``background``; rows grouped by background.

    Run it on the base and on base + subject adapter with the same arguments and pass both to
    :func:`compare` to see how much of the prior the adapter destroyed (``tuner eval --mode prior --lora``).
    """
    _check_count("seeds", seeds)
    cases = [
        EvalCase(f"a star on a {bg} background", seed + k, {"star": "star", "background": bg}, group=bg)
        for bg in EVAL_BACKGROUNDS
        for k in range(seeds)
    ]
    return evaluate_cases(base, "prior", cases, settings, progress=progress)


def eval_style(
    base: BaseModel,
    *,
    seeds: int = 8,
    seed: int = 0,
    shapes: Sequence[str] = STYLE_NEW_SHAPES + STYLE_TRAINED_SHAPES,
    settings: SampleSettings | None = None,
    progress: bool = False,
) -> EvalReport:
    """Does ``outline style`` carry over to shapes its training set never showed? ``seeds`` images per shape
    (image ``k`` of a shape uses seed ``seed + k``), prompted
    ``a large {color} {shape} on a {bg} background, {position}, outline style``; colour, background and
    position are drawn by ``default_rng(seed)`` (colour != background, no held-out (shape, colour) pair, so
    the style is the only new thing). Metrics: ``outline`` (:attr:`Judgement.is_outline`), shape, color.
    Rows grouped ``new: diamond`` / ``trained: circle`` ... by shape.

    Always large: a small ring's 3-pixel outline *is* the ring (the judge cannot tell them apart) and small
    triangles and crosses in outline are nearly filled; the style training set is mostly large too.
    """
    _check_count("seeds", seeds)

    def make(shape: str, color: str, bg: str, size: str, position: str) -> Scene | None:
        if color == bg or (shape, color) in HELD_OUT:
            return None
        return Scene(shape, color, bg, "large", position, style="outline")

    cases = [
        scene_case(
            s,
            seed + i % seeds,
            ("outline", "shape", "color"),
            group=f"{'trained' if s.shape in STYLE_TRAINED_SHAPES else 'new'}: {s.shape}",
        )
        for i, s in enumerate(_random_scenes(shapes, seeds, seed, make))
    ]
    return evaluate_cases(base, "style", cases, settings, progress=progress)


def eval_color(
    base: BaseModel,
    *,
    token: str = PINK_TOKEN,
    shapes: Sequence[str] = COLOR_SHAPES,
    seeds: int = 8,
    seed: int = 0,
    settings: SampleSettings | None = None,
    progress: bool = False,
) -> EvalReport:
    """Is the learned colour drawn, also on shapes and backgrounds its training set never had? ``seeds``
    images per shape (image ``k`` of a shape uses seed ``seed + k``), prompted
    ``a {size} {token} {shape} on a {bg} background, {position}``, with background, size and position drawn
    by ``default_rng(seed)`` over the whole palette. Metrics: ``color`` (judged colour is pink, whatever
    ``token`` is called) and shape. Rows grouped ``trained: circle`` (the shapes of the pink training set:
    circle, square, heart) / ``new: star`` ... by shape.
    """
    _check_count("seeds", seeds)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise TunerError(f"unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(SHAPES)}")

    def make(shape: str, _color: str, bg: str, size: str, position: str) -> Scene:
        return Scene(shape, PINK_NAME, bg, size, position)

    cases = []
    for i, s in enumerate(_random_scenes(shapes, seeds, seed, make)):
        prompt = caption(s, drop_size=False, drop_position=False).replace(PINK_TOKEN, token, 1)
        group = f"{'trained' if s.shape in _PINK_TRAINED_SHAPES else 'new'}: {s.shape}"
        cases.append(scene_case(s, seed + i % seeds, ("color", "shape"), group=group, prompt=prompt))
    return evaluate_cases(base, "color", cases, settings, progress=progress)


def run_eval(
    mode: str,
    base: BaseModel,
    *,
    n: int = 200,
    seeds: int = 8,
    seed: int = 0,
    token: str = PINK_TOKEN,
    settings: SampleSettings | None = None,
    progress: bool = False,
) -> EvalReport:
    """Run the check named ``mode`` (one of :data:`EVAL_MODES`): ``n`` is used by ``base`` / ``heldout``,
    ``seeds`` by the others, ``token`` by ``color``."""
    common: dict[str, Any] = {"seed": seed, "settings": settings, "progress": progress}
    if mode in ("base", "heldout"):
        return eval_base(base, split="seen" if mode == "base" else "heldout", n=n, **common)
    if mode == "subject":
        return eval_subject(base, seeds=seeds, **common)
    if mode == "prior":
        return eval_prior(base, seeds=seeds, **common)
    if mode == "style":
        return eval_style(base, seeds=seeds, **common)
    if mode == "color":
        return eval_color(base, token=token, seeds=seeds, **common)
    raise TunerError(f"unknown eval mode {mode!r}; choose from {', '.join(EVAL_MODES)}")
