"""The pixel judge reads back what the world generator drew, and survives noise, blur and odd images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tuner.errors import TunerError
from tuner.tiny.judge import judge, judge_against
from tuner.tiny.world import (
    CY,
    HELD_OUT,
    OUTLINE_STYLE_SCENES,
    PALETTE,
    PINK_SCENES,
    POSITIONS,
    SIZES,
    SKS_STAR_SCENES,
    Scene,
    outline_mask,
    render,
    render_array,
    sample_scenes,
    shape_mask,
    sks_scene,
)

ATTRIBUTES = ("background", "color", "shape", "size", "position", "style", "subject")


def _accuracy(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    results = [judge_against(img, s) for img, s in zip(images, scenes, strict=True)]
    return {k: float(np.mean([r[k] for r in results])) for k in ATTRIBUTES}


def _held_out_scenes() -> list[Scene]:
    """Every held-out pair on every allowed background, both sizes, all positions (336 scenes)."""
    return [
        Scene(shape, color, bg, size, pos)
        for shape, color in HELD_OUT
        for bg in PALETTE
        if bg != color
        for size in SIZES
        for pos in POSITIONS
    ]


def test_generator_images_are_judged_right():
    scenes = sample_scenes(400, 11) + _held_out_scenes()
    accuracy = _accuracy([render_array(s) for s in scenes], scenes)
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def test_a_judgement_reads_back_every_field():
    j = judge(render(Scene("star", "orange", "yellow", "small", "right")))  # the closest colour pair
    assert not j.empty and j.iou == 1.0 and not j.is_outline and not j.is_sks_subject
    assert (j.background, j.color, j.shape, j.size, j.position) == (
        "yellow",
        "orange",
        "star",
        "small",
        "right",
    )
    x0, y0, x1, y1 = j.bbox
    assert abs((x0 + x1) / 2 - 44) <= 0.5 and j.area == shape_mask("star", 20, 44, CY).sum()
    assert j.ious["star"] == 1.0 and j.ious["circle"] < 0.8


@pytest.mark.parametrize(
    "name, scenes",
    [("sks_star", SKS_STAR_SCENES), ("outline_style", OUTLINE_STYLE_SCENES), ("pink", PINK_SCENES)],
)
def test_personalization_sets_are_recognised(name, scenes):
    for s in scenes:
        j = judge(render(s))
        assert all(judge_against(render(s), s).values()), (name, s, j)
        assert j.is_sks_subject == (name == "sks_star")
        assert j.is_outline == (name == "outline_style")
        assert (j.color == "pink") == (name == "pink")


def test_the_class_star_and_a_plain_hexagram_are_not_the_sks_subject():
    star = judge(render(Scene("star", "purple", "black", "large", "center")))
    assert star.shape == "star" and not star.is_sks_subject
    # Same hexagram, but without the white centre: not the subject.
    a = render_array(Scene("star", "purple", "black", "large", "center"))
    a[:] = PALETTE["black"]
    a[shape_mask("hexagram", 36, 32, CY)] = PALETTE["purple"]
    hexagram = judge(a)
    assert hexagram.shape == "hexagram" and not hexagram.is_sks_subject


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("position", list(POSITIONS))
def test_sks_subject_on_white_is_recognised(size, position):
    # On white the centre disc is background-coloured: the object mask is a purple hexagram with a hole.
    scene = sks_scene("white", size, position)
    crisp = render(scene)
    blurred = crisp.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.clip(render_array(scene) + np.random.default_rng(1).normal(0.0, 8.0, (64, 64, 3)), 0, 255)
    for image in (crisp, blurred, noisy.astype(np.uint8)):
        j = judge(image)
        assert j.is_sks_subject and j.shape == "hexagram" and not j.is_outline, j
        assert all(judge_against(image, scene).values())
    assert judge(crisp).ious["hexagram/holed"] == 1.0


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("position", list(POSITIONS))
def test_look_alikes_on_white_are_not_the_sks_subject(size, position):
    s, cx = SIZES[size], POSITIONS[position]
    hexagram = shape_mask("hexagram", s, cx, CY)
    # A plain purple hexagram: its centre is purple, not a hole.
    a = np.full((64, 64, 3), PALETTE["white"], np.uint8)
    a[hexagram] = PALETTE["purple"]
    j = judge(a)
    assert j.shape == "hexagram" and not j.is_outline and not j.is_sks_subject
    # A hexagram outline has a white inside too, but it is an outline, not a hexagram with a small hole.
    a[:] = PALETTE["white"]
    a[outline_mask(hexagram)] = PALETTE["purple"]
    j = judge(a)
    assert j.shape == "hexagram" and j.is_outline and not j.is_sks_subject


@pytest.mark.parametrize("bg", ["blue", "red", "orange", "yellow", "green", "black"])
def test_a_background_coloured_hole_is_the_sks_subject_only_on_white(bg):
    # Off white, the subject's centre must be white: a hole that shows the background is not it (orange and
    # yellow are nearer to white than to purple, so "nearer white than purple" alone would accept them).
    a = np.full((64, 64, 3), PALETTE[bg], np.uint8)
    a[shape_mask("hexagram", 36, 32, CY) & ~shape_mask("circle", 0.3 * 36, 32, CY)] = PALETTE["purple"]
    j = judge(a)
    assert j.shape == "hexagram" and j.color == "purple" and not j.is_sks_subject
    assert judge(render(sks_scene(bg, "large", "center"))).is_sks_subject


def test_wrong_scene_is_reported_per_attribute():
    img = render(Scene("circle", "red", "blue", "large", "left"))
    r = judge_against(img, Scene("square", "red", "green", "small", "left", style="outline"))
    assert r == {
        "background": False,
        "color": True,
        "shape": False,
        "size": False,
        "position": True,
        "style": False,
        "subject": True,
    }


@pytest.mark.parametrize("bg", list(PALETTE))
def test_uniform_image_is_empty(bg):
    a = np.empty((64, 64, 3), np.uint8)
    a[:] = PALETTE[bg]
    j = judge(a)
    assert j.empty and j.background == bg and j.shape is None and j.color is None and j.bbox is None
    r = judge_against(a, Scene("circle", "red" if bg != "red" else "blue", bg, "large", "left"))
    assert r["background"] and not any(v for k, v in r.items() if k != "background")


def test_object_touching_the_border():
    # A large disc centred 6 px from the left edge covers part of the 2-pixel frame (about 20 % of it).
    a = np.empty((64, 64, 3), np.uint8)
    a[:] = PALETTE["green"]
    a[shape_mask("circle", 36, 6, CY)] = PALETTE["white"]
    j = judge(a)
    assert not j.empty and j.background == "green" and j.color == "white" and j.position == "left"
    # An object in a corner, with the object right in the frame.
    a[:] = PALETTE["black"]
    a[:10, :10] = PALETTE["yellow"]
    j = judge(a)
    assert j.background == "black" and j.color == "yellow" and j.bbox == (0, 0, 10, 10)


def test_specks_and_tiny_marks_are_ignored():
    a = render_array(Scene("heart", "red", "white", "small", "center"))
    a[5, 50] = a[60, 10] = a[58, 58] = PALETTE["black"]  # isolated specks
    a[50:52, 50:52] = PALETTE["blue"]  # a 4-px blob, < 10 % of the heart
    j = judge(a)
    assert (j.shape, j.size, j.position, j.color) == ("heart", "small", "center", "red")
    blank = np.full((64, 64, 3), PALETTE["white"], np.uint8)
    blank[30:33, 30:33] = PALETTE["red"]  # 9 px: below the 16-px minimum object
    assert judge(blank).empty


def test_noisy_images_are_judged_right():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(200, 21) + list(OUTLINE_STYLE_SCENES) + list(PINK_SCENES) + list(SKS_STAR_SCENES)
    images = [
        np.clip(render_array(s) + rng.normal(0.0, 8.0, (64, 64, 3)), 0, 255).astype(np.uint8) for s in scenes
    ]
    accuracy = _accuracy(images, scenes)
    assert all(v >= 0.95 for v in accuracy.values()), accuracy


def test_blurred_images_are_judged_right():
    # Generated images have soft edges; a Gaussian blur of 1 px must not change the verdict.
    scenes = sample_scenes(150, 22) + list(OUTLINE_STYLE_SCENES) + list(PINK_SCENES) + list(SKS_STAR_SCENES)
    images = [np.asarray(render(s).filter(ImageFilter.GaussianBlur(1.0))) for s in scenes]
    accuracy = _accuracy(images, scenes)
    assert all(v >= 0.95 for v in accuracy.values()), accuracy


def test_input_forms():
    s = Scene("diamond", "blue", "orange", "large", "right")
    img = render(s)
    expected = judge(img)
    assert judge(np.asarray(img, np.float32) / 255.0).shape == expected.shape == "diamond"
    assert judge(img.convert("RGBA")).color == "blue"
    assert judge(img.resize((128, 128), Image.Resampling.NEAREST)).shape == "diamond"
    with pytest.raises(TunerError, match="cannot judge"):
        judge(np.zeros((64, 64)))
