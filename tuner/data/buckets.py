"""Aspect-ratio buckets: train on images of any shape without squashing them into one square.

The rules follow kohya's sd-scripts (``--enable_bucket``), so a dataset lands in the same buckets there:

- **Buckets** (:func:`make_buckets`) have about the area ``resolution**2``, sides multiples of ``step``
  between ``min_size`` and ``max_size``: the square ``floor(resolution / step) * step``, and for each width
  ``w = min_size, min_size + step, ... <= max_size`` the height ``min(max_size, floor(area / w / step) *
  step)`` (if at least ``min_size``), in both orientations.
- **Assignment** (:func:`assign_bucket`): an image whose size is a bucket keeps it; otherwise it goes to the
  bucket whose aspect ratio (width / height) is nearest to its own (the first in sorted order on a tie). It is
  resized to cover the bucket (scale = the bucket's height / the image's height when the image is wider than
  the bucket, else width / width; sides rounded half up) and cropped to it.
- **No upscaling** (:func:`no_upscale_bucket`): the buckets come from the images instead. An image larger
  than the area is first scaled down to that area (keeping its aspect ratio, one side rounded to the step, the
  one giving the smaller aspect error); an image within the area keeps its size. The bucket is that size with
  each side rounded down to the step, and the image is cropped to it, never enlarged (a side under one step
  is the exception: it becomes one step, enlarging that image a little, where kohya would make an empty side).

Sizes are ``(width, height)`` in pixels throughout, as PIL gives them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tuner.errors import TunerError

Size = tuple[int, int]


@dataclass(frozen=True)
class Assignment:
    """Where one image goes: ``bucket`` (the training size) and ``resized`` (the size it is resized to before
    the crop; each side >= the bucket's)."""

    bucket: Size
    resized: Size


def bucket_settings(resolution: int, *, step: int, min_size: int = 0, max_size: int = 0) -> tuple[int, int]:
    """Resolve and check ``(min_size, max_size)``: 0 means ``resolution // 2`` and ``resolution * 2`` (kohya's
    defaults of 256 and 1024 at 512 px), rounded to the step. Raises :class:`TunerError` naming the recipe key."""
    if step <= 0:
        raise TunerError(f"data.bucket_step = {step}: expected a positive number of pixels")
    lo = min_size or max(step, resolution // 2 // step * step)
    hi = max_size or resolution * 2 // step * step
    problems = []
    for key, value in (("data.min_bucket_reso", lo), ("data.max_bucket_reso", hi)):
        if value % step:
            problems.append(f"{key} = {value} is not a multiple of the bucket step {step} (data.bucket_step)")
    if lo < step:
        problems.append(f"data.min_bucket_reso = {lo} is below the bucket step {step}")
    if lo > resolution:
        problems.append(f"data.min_bucket_reso = {lo} is above the resolution {resolution}: expected <= {resolution}")
    if hi < resolution:
        problems.append(f"data.max_bucket_reso = {hi} is below the resolution {resolution}: expected >= {resolution}")
    if problems:
        raise TunerError("aspect-ratio buckets: " + "; ".join(problems))
    return lo, hi


def make_buckets(resolution: int, *, step: int, min_size: int, max_size: int) -> list[Size]:
    """The predefined buckets (``(width, height)``, sorted) for a target area of ``resolution**2``."""
    area = resolution * resolution
    square = math.isqrt(area) // step * step
    buckets = {(square, square)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, area // width // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def cover_size(image: Size, bucket: Size) -> Size:
    """The size ``image`` is resized to so that it covers ``bucket`` with its aspect ratio kept (kohya's
    rounding: half up), never below the bucket on either side."""
    (w, h), (bw, bh) = image, bucket
    scale = bh / h if w / h > bw / bh else bw / w
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def assign_bucket(image: Size, buckets: Sequence[Size]) -> Assignment:
    """The predefined bucket for an image of size ``image``: its own size if that is a bucket, else the
    nearest aspect ratio (ties: the first bucket in ``buckets``' order)."""
    if tuple(image) in buckets:
        bucket = (int(image[0]), int(image[1]))
    else:
        ratio = image[0] / image[1]
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))
    return Assignment(bucket=bucket, resized=cover_size(image, bucket))


def _round_to_step(x: float, step: int) -> int:
    n = int(x + 0.5)
    return n - n % step


def no_upscale_bucket(image: Size, *, resolution: int, step: int) -> Assignment:
    """The bucket of an image under ``bucket_no_upscale`` (rules in the module docstring)."""
    w, h = image
    area = resolution * resolution
    ratio = w / h
    if w * h > area:
        # scale down to the area, then put one side on the step: the one whose rounding distorts less
        width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
        by_w = _round_to_step(width, step)
        by_h = _round_to_step(height, step)
        error_w = abs(by_w / max(1, _round_to_step(by_w / ratio, step)) - ratio) if by_w else math.inf
        error_h = abs(_round_to_step(by_h * ratio, step) / by_h - ratio) if by_h else math.inf
        if error_w < error_h:
            resized = (by_w, int(by_w / ratio + 0.5))
        else:
            resized = (int(by_h * ratio + 0.5), by_h)
    else:
        resized = (w, h)
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    if bucket[0] > resized[0] or bucket[1] > resized[1]:  # a side under one step: enlarge to cover it
        resized = cover_size(image, bucket)
    return Assignment(bucket=bucket, resized=resized)


@dataclass(frozen=True)
class BucketPlan:
    """Every image's bucket, fixed before training (so cached latents and resumes agree).

    ``assignments[k]`` belongs to item ``k`` of the dataset index; ``buckets`` lists the buckets that hold at
    least one image, sorted; ``sizes`` the images' original sizes.
    """

    step: int
    min_size: int
    max_size: int
    no_upscale: bool
    assignments: tuple[Assignment, ...]
    sizes: tuple[Size, ...]

    @property
    def buckets(self) -> list[Size]:
        return sorted({a.bucket for a in self.assignments})

    def bucket_of(self, item: int) -> Size:
        return self.assignments[item].bucket

    def counts(self) -> dict[Size, int]:
        """bucket -> number of images in it (sorted by bucket)."""
        return dict(sorted(Counter(a.bucket for a in self.assignments).items()))

    def upscaled(self) -> list[int]:
        """Items enlarged to reach their bucket (a blurry training image)."""
        return [k for k, (a, s) in enumerate(zip(self.assignments, self.sizes)) if a.resized[0] > s[0]]

    def summary(self) -> str:
        """One line for logs and ``tuner validate``: each bucket with its image count, and upscaled images."""
        parts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.counts().items())
        mode = "no upscaling" if self.no_upscale else f"sides {self.min_size}-{self.max_size} px"
        text = f"buckets (width x height: images; step {self.step} px, {mode}): {parts}"
        enlarged = self.upscaled()
        if enlarged:
            text += f"; {len(enlarged)} image(s) are upscaled to reach their bucket"
        return text


def plan_buckets(
    sizes: Sequence[Size],
    *,
    resolution: int,
    step: int,
    min_size: int = 0,
    max_size: int = 0,
    no_upscale: bool = False,
) -> BucketPlan:
    """Assign each image (by its ``(width, height)``) to a bucket. ``min_size``/``max_size`` of 0 take the
    defaults of :func:`bucket_settings`; they do not apply with ``no_upscale`` (as in kohya)."""
    lo, hi = bucket_settings(resolution, step=step, min_size=min_size, max_size=max_size)
    if any(w <= 0 or h <= 0 for w, h in sizes):
        raise TunerError("aspect-ratio buckets need every image's size; an image has none (0x0)")
    if no_upscale:
        assignments = [no_upscale_bucket(s, resolution=resolution, step=step) for s in sizes]
    else:
        buckets = make_buckets(resolution, step=step, min_size=lo, max_size=hi)
        assignments = [assign_bucket(s, buckets) for s in sizes]
    return BucketPlan(step=step, min_size=lo, max_size=hi, no_upscale=no_upscale,
                      assignments=tuple(assignments), sizes=tuple((int(w), int(h)) for w, h in sizes))


def plan_in_buckets(sizes: Sequence[Size], plan: BucketPlan) -> BucketPlan:
    """A plan for other images (prior preservation's class images) that uses only ``plan``'s buckets: each
    image goes to the one nearest its aspect ratio and is resized to cover it (:func:`assign_bucket`), so
    every batch can pair images of one bucket from both sets."""
    if any(w <= 0 or h <= 0 for w, h in sizes):
        raise TunerError("aspect-ratio buckets need every image's size; an image has none (0x0)")
    buckets = plan.buckets
    return BucketPlan(step=plan.step, min_size=plan.min_size, max_size=plan.max_size, no_upscale=plan.no_upscale,
                      assignments=tuple(assign_bucket(s, buckets) for s in sizes),
                      sizes=tuple((int(w), int(h)) for w, h in sizes))


def bucket_quotas(counts: dict[Size, int], total: int) -> dict[Size, int]:
    """Split ``total`` images over buckets in proportion to ``counts`` (bucket -> instance samples), largest
    remainders first, at least one per bucket (so the total can exceed ``total`` with many buckets)."""
    weight = sum(counts.values())
    if weight <= 0:
        raise ValueError("bucket_quotas needs at least one counted bucket")
    exact = {b: total * n / weight for b, n in counts.items()}
    quotas = {b: int(x) for b, x in exact.items()}
    for b in sorted(exact, key=lambda b: (quotas[b] - exact[b], b))[: max(0, total - sum(quotas.values()))]:
        quotas[b] += 1
    return {b: max(1, q) for b, q in sorted(quotas.items())}
