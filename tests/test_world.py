"""The toy world generator draws exactly the world of WORLD.md (geometry, sampling, captions, datasets)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from PIL import Image

from tuner.errors import TunerError
from tuner.tiny import world as w
from tuner.tiny.world import (
    CANVAS,
    CY,
    HELD_OUT,
    PALETTE,
    PINK,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption,
    outline_mask,
    render,
    sample_scenes,
    shape_mask,
    sks_scene,
    write_personalization_sets,
    write_world,
)


def _components(mask: np.ndarray) -> int:
    """Number of 8-connected components (plain flood fill; independent of the judge's implementation)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if (
                        0 <= ny < mask.shape[0]
                        and 0 <= nx < mask.shape[1]
                        and mask[ny, nx]
                        and not seen[ny, nx]
                    ):
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def _disc(radius: float, cx: float = 32, cy: float = CY) -> np.ndarray:
    c = np.arange(CANVAS) + 0.5
    X, Y = np.meshgrid(c, c)
    return (X - cx) ** 2 + (Y - cy) ** 2 <= radius**2


# ---------------------------------------------------------------------------------------------------------
# Constants and geometry
# ---------------------------------------------------------------------------------------------------------


def test_world_constants_match_the_spec():
    assert PALETTE["red"] == (220, 40, 40) and PALETTE["black"] == (20, 20, 20) and len(PALETTE) == 8
    assert PINK == (250, 130, 200) and PINK not in PALETTE.values()
    assert SHAPES == ("circle", "square", "triangle", "diamond", "star", "heart", "cross", "ring")
    assert SIZES == {"small": 20, "large": 36}
    assert POSITIONS == {"left": 20, "center": 32, "right": 44} and CY == 32 and CANVAS == 64
    assert len(HELD_OUT) == 8 and {s for s, _ in HELD_OUT} == set(SHAPES)
    assert ("circle", "purple") in HELD_OUT and ("ring", "black") in HELD_OUT


@pytest.mark.parametrize("size", [20, 36])
def test_areas_match_the_geometry(size):
    r = size / 2
    expected = {
        "circle": math.pi * r * r,
        "square": (1.6 * r) ** 2,
        "diamond": 2 * r * r,
        "triangle": 3 * math.sqrt(3) / 4 * r * r,
        "ring": math.pi * (r * r - (0.55 * r) ** 2),
        "cross": 2 * (2 * r * 0.7 * r) - (0.7 * r) ** 2,
        "hexagram": math.sqrt(3) * r * r,
        # star: 10 triangles (centre, outer vertex, inner vertex) with the 36-degree angle between them
        "star": 10 * 0.5 * r * 0.45 * r * math.sin(math.radians(36)),
    }
    for shape, area in expected.items():
        got = int(shape_mask(shape, size, 32, CY).sum())
        # Pixel-centre sampling of a boundary-inclusive shape: the error is about half the perimeter in px.
        # The square also rounds 1.6 R = 28.8 down to 28 pixel centres.
        tolerance = 0.06 if size == 36 else 0.12
        assert abs(got - area) / area < tolerance, (shape, size, got, area)


def test_circle_area_within_a_few_percent_and_symmetric():
    m = shape_mask("circle", 36, 32, CY)
    assert abs(m.sum() - math.pi * 18**2) / (math.pi * 18**2) < 0.03
    assert np.array_equal(m, m[:, ::-1]) and np.array_equal(m, m[::-1, :])  # centred between pixels 31/32


def test_square_side_is_1_6_r():
    for size, side in ((20, 16), (36, 28)):  # 1.6 R = 16 and 28.8 -> 28 pixel centres
        m = shape_mask("square", size, 32, CY)
        ys, xs = np.nonzero(m)
        assert xs.max() - xs.min() + 1 == side and ys.max() - ys.min() + 1 == side
        assert m.sum() == side * side


def test_box_extents():
    # circle, diamond, ring, cross, heart (width) and hexagram (height) span the whole box side 2R.
    for shape in ("circle", "diamond", "ring", "cross", "heart"):
        xs = np.nonzero(shape_mask(shape, 36, 44, CY))[1]
        assert (xs.min(), xs.max() + 1) == (44 - 18, 44 + 18), shape
    # A vertex exactly on the box edge is too thin to cover a pixel centre: pointed ends lose <= 1 row.
    ys = np.nonzero(shape_mask("hexagram", 36, 32, CY))[0]
    assert (ys.min(), ys.max() + 1) == (CY - 18 + 1, CY + 18 - 1)


def test_triangle_has_one_vertex_up():
    m = shape_mask("triangle", 36, 32, CY)
    ys, xs = np.nonzero(m)
    # The apex is on the circle of radius R; its row is too thin to cover a pixel centre.
    assert ys.min() == CY - 18 + 1
    assert ys.max() + 1 == CY + 9  # the base is at R/2 below the centre
    top, bottom = m[ys.min()].sum(), m[ys.max()].sum()
    assert top <= 2 and bottom >= 28  # narrow at the top, wide (~R sqrt 3 = 31) at the bottom


def test_heart_point_is_down_and_it_is_centred_on_its_box():
    m = shape_mask("heart", 36, 32, CY)
    ys, _ = np.nonzero(m)
    assert m[ys.max()].sum() <= 2  # the point
    assert m[ys.min()].sum() > 2  # two lobes at the top
    height = 36 * 28.92 / 32  # the curve is 32 wide and ~28.92 tall; the width is scaled to 2R
    assert abs((ys.max() + 1 - ys.min()) - height) <= 2  # the point and the lobe tops each lose <= 1 row
    assert abs((ys.min() + ys.max() + 1) / 2 - CY) <= 0.5


@pytest.mark.parametrize("shape, tips, hub", [("star", 5, 0.6), ("hexagram", 6, 0.7)])
def test_star_tips(shape, tips, hub):
    m = shape_mask(shape, 36, 32, CY)
    assert _components(m) == 1
    # Removing the hub (the star's inner radius is 0.45 R; the hexagram's 1/sqrt 3 = 0.577 R) frees the tips.
    assert _components(m & ~_disc(hub * 18)) == tips
    ys, xs = np.nonzero(m)
    assert ys.min() == CY - 18 + 1  # one point straight up, its apex row too thin to cover a pixel centre
    assert abs(xs[ys == ys.min()].mean() - 31.5) <= 0.5


def test_ring_has_a_hole_and_cross_has_arms():
    ring = shape_mask("ring", 36, 32, CY)
    assert not ring[_disc(0.5 * 18)].any() and ring[_disc(18) & ~_disc(0.6 * 18)].all()
    cross = shape_mask("cross", 36, 32, CY)
    assert not cross[CY - 12, 32 - 12] and cross[CY, 32 - 17] and cross[CY - 17, 32]


def test_unknown_shape_is_an_error():
    with pytest.raises(TunerError, match="unknown shape"):
        shape_mask("blob", 20, 32, CY)


def test_outline_is_three_pixels_and_hollow():
    square = shape_mask("square", 36, 32, CY)
    line = outline_mask(square)
    assert line.sum() < square.sum() and (line & ~square).sum() == 0
    row = line[CY]
    assert row.sum() == 6  # 3 pixels on each side of the 28-px square
    assert not line[CY, 32]  # the inside is background
    # The outline of a shape that touches the canvas edge counts the edge as outside.
    assert outline_mask(np.ones((8, 8), bool)).sum() == 64 - 4


def test_render_draws_colours_outline_sks_and_pink():
    a = np.asarray(render(Scene("circle", "red", "blue", "large", "left")))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert tuple(a[0, 0]) == PALETTE["blue"] and tuple(a[CY, 20]) == PALETTE["red"]
    o = np.asarray(render(Scene("circle", "red", "blue", "large", "left", style="outline")))
    assert tuple(o[CY, 20]) == PALETTE["blue"] and tuple(o[CY, 20 - 17]) == PALETTE["red"]
    s = np.asarray(render(sks_scene("green", "large", "center")))
    assert tuple(s[CY, 32]) == PALETTE["white"] and tuple(s[CY - 16, 32]) == PALETTE["purple"]
    assert (np.all(s == PALETTE["white"], axis=2)).sum() == _disc(0.3 * 18).sum()
    p = np.asarray(render(Scene("heart", "pink", "black", "small", "right")))
    assert tuple(p[CY, 44]) == PINK


def test_scene_validation():
    with pytest.raises(TunerError, match="must differ"):
        Scene("circle", "red", "red", "large", "left")
    with pytest.raises(TunerError, match="shape 'blob'"):
        Scene("blob", "red", "blue", "large", "left")
    with pytest.raises(TunerError, match="size.*position"):
        Scene("circle", "red", "blue", "huge", "top")
    with pytest.raises(TunerError, match="sks subject"):
        Scene("star", "purple", "blue", "large", "left", subject="sks")
    with pytest.raises(TunerError, match="background 'pink'"):
        Scene("circle", "red", "pink", "large", "left")


# ---------------------------------------------------------------------------------------------------------
# Captions and sampling
# ---------------------------------------------------------------------------------------------------------


def test_caption_format():
    s = Scene("circle", "red", "blue", "large", "center")
    assert caption(s) == "a large red circle on a blue background, in the center"
    assert caption(s, drop_size=True, drop_position=True) == "a red circle on a blue background"
    assert (
        caption(s, drop_size=True, drop_position=False) == "a red circle on a blue background, in the center"
    )
    assert caption(s, drop_size=False, drop_position=True) == "a large red circle on a blue background"
    assert caption(Scene("ring", "black", "white", "small", "left")) == (
        "a small black ring on a white background, on the left"
    )
    assert caption(Scene("heart", "pink", "green", "small", "right")) == (
        "a small <pink> heart on a green background, on the right"
    )
    assert (
        caption(sks_scene("yellow", "large", "right"))
        == "a large sks star on a yellow background, on the right"
    )
    assert caption(Scene("cross", "blue", "orange", "large", "left", style="outline")) == (
        "a large blue cross on a orange background, on the left, outline style"
    )
    dropped = Scene("star", "blue", "white", "small", "left", drop_size=True)
    assert caption(dropped) == "a blue star on a white background, on the left"
    assert caption(dropped, drop_position=True, drop_color=True) == "a star on a white background"
    assert caption(Scene("heart", "pink", "green", "small", "right"), drop_color=True) == (
        "a small heart on a green background, on the right"
    )
    assert caption(sks_scene("yellow", "large", "right"), drop_color=True) == (
        "a large sks star on a yellow background, on the right"
    )
    assert caption(dropped, drop_size=False, drop_position=False).startswith("a small blue star")


def test_sampling_is_deterministic_for_a_seed():
    assert sample_scenes(50, 7) == sample_scenes(50, 7)
    assert sample_scenes(50, 7) != sample_scenes(50, 8)
    assert sample_scenes(20, 3, "heldout") == sample_scenes(20, 3, "heldout")
    assert sample_scenes(0, 1) == []


def test_golden_scenes_at_seed_0():
    # The pretrained tiny base was trained on this exact stream: changing it silently changes the base.
    got = [caption(s) for s in sample_scenes(4, 0)]
    digest = hashlib.sha256(b"".join(render(s).tobytes() for s in sample_scenes(16, 0))).hexdigest()
    assert got == GOLDEN_CAPTIONS
    assert digest == GOLDEN_DIGEST


GOLDEN_CAPTIONS = [
    "a purple cross on a blue background, on the left",
    "a large black star on a yellow background",
    "a large white circle on a purple background, on the left",
    "a yellow circle on a green background, in the center",
]
GOLDEN_DIGEST = "bd38d6f4d2dbeaf45beb49ac56dd60801abca88d24caedd7bec12b47772e85e3"


def test_held_out_pairs_never_in_pretrain_and_only_in_heldout():
    held = set(HELD_OUT)
    pretrain = sample_scenes(3000, 0)
    assert not {(s.shape, s.color) for s in pretrain} & held
    assert len({(s.shape, s.color) for s in pretrain}) == 64 - 8  # every other pair does appear
    heldout = sample_scenes(400, 0, "heldout")
    assert {(s.shape, s.color) for s in heldout} == held
    assert all(not (s.drop_size or s.drop_position) for s in heldout)  # canonical captions


def test_colour_never_equals_background_and_attributes_are_uniform():
    scenes = sample_scenes(3000, 1) + sample_scenes(500, 1, "heldout")
    assert all(s.color != s.background for s in scenes)
    pretrain = scenes[:3000]
    for attr, values in (
        ("shape", SHAPES),
        ("background", PALETTE),
        ("size", SIZES),
        ("position", POSITIONS),
    ):
        counts = np.array([sum(getattr(s, attr) == v for s in pretrain) for v in values])
        assert counts.min() > 0.75 * len(pretrain) / len(values), (attr, counts)


def test_phrase_drop_rates_are_0_3():
    scenes = sample_scenes(2000, 0)
    size_rate = np.mean([s.drop_size for s in scenes])
    position_rate = np.mean([s.drop_position for s in scenes])
    both = np.mean([s.drop_size and s.drop_position for s in scenes])
    assert 0.27 <= size_rate <= 0.33 and 0.27 <= position_rate <= 0.33
    assert 0.06 <= both <= 0.12  # independent: ~0.09
    captions = [caption(s) for s in scenes]
    assert np.mean([" background, " not in c for c in captions]) == position_rate
    assert np.mean([c.split()[1] not in SIZES for c in captions]) == size_rate


def test_sample_scenes_rejects_bad_arguments():
    with pytest.raises(TunerError, match="split"):
        sample_scenes(3, 0, "train")  # type: ignore[arg-type]
    with pytest.raises(TunerError, match="n must be"):
        sample_scenes(-1, 0)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def test_write_world(tmp_path):
    paths = write_world(tmp_path / "w", 12, seed=5)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(12)]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(
        [f"{i:05d}.png" for i in range(12)] + [f"{i:05d}.txt" for i in range(12)]
    )  # no temporary files left behind
    for p, s in zip(paths, sample_scenes(12, 5), strict=True):
        assert p.with_suffix(".txt").read_text() == caption(s) + "\n"
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(render(s)))


def test_personalization_sets(tmp_path):
    written = write_personalization_sets(tmp_path)
    assert {k: len(v) for k, v in written.items()} == {"sks_star": 6, "outline_style": 12, "pink": 6}
    for name in written:
        readme = (tmp_path / name / "README.md").read_text()
        assert "write_personalization_sets" in readme and "Captions" in readme

    sks = w.SKS_STAR_SCENES
    assert {s.background for s in sks} == {"black", "green", "yellow"}
    assert {s.size for s in sks} == set(SIZES) and {s.position for s in sks} == set(POSITIONS)
    assert all(s.subject == "sks" for s in sks)
    caps = [p.with_suffix(".txt").read_text().strip() for p in written["sks_star"]]
    assert caps[0] == "a large sks star on a black background, on the left"
    assert all(c.startswith(("a small sks star on a ", "a large sks star on a ")) for c in caps)

    outline = w.OUTLINE_STYLE_SCENES
    assert {s.shape for s in outline} == {"circle", "square", "triangle", "cross"}
    assert all(s.style == "outline" for s in outline)
    assert not {(s.shape, s.color) for s in outline} & set(HELD_OUT)
    caps = [p.with_suffix(".txt").read_text().strip() for p in written["outline_style"]]
    assert all(c.endswith(", outline style") for c in caps)
    assert caps[0] == "a large red circle on a blue background, in the center, outline style"

    pink = w.PINK_SCENES
    assert {s.shape for s in pink} == {"circle", "square", "heart"}
    assert {s.background for s in pink} == {"black", "blue", "green"} and {s.color for s in pink} == {"pink"}
    caps = [p.with_suffix(".txt").read_text().strip() for p in written["pink"]]
    assert caps[0] == "a large <pink> circle on a black background, in the center"
    assert all("<pink>" in c for c in caps)

    for scenes in (sks, outline, pink):
        assert {s.size for s in scenes} == set(SIZES) and {s.position for s in scenes} == set(POSITIONS)
        assert len(set(scenes)) == len(scenes)
