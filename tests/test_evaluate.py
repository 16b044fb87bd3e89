"""The quality checks measure what they claim.

The embedded base is not trained yet, so these tests swap the sampler for a "model" that draws, with the
world generator, the scene a prompt describes (read back with the world's vocabulary): every metric must
then be 100 %. A model that gets exactly one thing wrong must lose exactly that metric. One smoke run goes
through the real sampler and the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import pytest
from PIL import Image

import tuner.tiny.evaluate as evaluate
from tuner.cli import main
from tuner.sample.sampler import SampleSettings
from tuner.tiny.evaluate import (
    EVAL_BACKGROUNDS,
    compare,
    eval_base,
    eval_color,
    eval_prior,
    eval_style,
    eval_subject,
    run_eval,
)
from tuner.tiny.judge import judge, judge_against
from tuner.tiny.world import (
    PALETTE,
    PINK_NAME,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    render,
    render_array,
    sample_scenes,
    sks_scene,
)

PHRASE_POSITIONS = {phrase: name for name, phrase in POSITION_PHRASES.items()}
COLOUR_WORDS = {**{c: c for c in PALETTE}, "<pink>": PINK_NAME, "<mypink>": PINK_NAME}


def scene_from_prompt(prompt: str) -> Scene:
    """The scene a prompt of the world's grammar describes (a bare ``star`` gets a colour the background
    allows; a missing size is large, a missing position is the center)."""
    text, outline = prompt.removesuffix(", outline style"), prompt.endswith(", outline style")
    head, _, rest = text.partition(" on a ")
    background_part, _, position_part = rest.partition(", ")
    background = background_part.removesuffix(" background")
    position = PHRASE_POSITIONS.get(position_part, "center")
    words = head.split()[1:]
    size = words.pop(0) if words[0] in SIZES else "large"
    if words == ["sks", "star"]:
        return sks_scene(background, size, position)
    *colour, shape = words
    color = COLOUR_WORDS[colour[0]] if colour else ("purple" if background != "purple" else "yellow")
    return Scene(shape, color, background, size, position, style="outline" if outline else "plain")


def faithful(base, prompts, seeds, settings) -> list[Image.Image]:
    assert len(prompts) == len(seeds)
    return [render(scene_from_prompt(p)) for p in prompts]


def wrong_position(base, prompts, seeds, settings) -> list[Image.Image]:
    moved = {"left": "right", "center": "left", "right": "center"}
    return [render(replace(s, position=moved[s.position])) for s in map(scene_from_prompt, prompts)]


def lossless_vae(base, scenes):
    return [render_array(s) for s in scenes]


@pytest.fixture
def model(monkeypatch):
    """``model(fn)``: make the quality checks "generate" with ``fn`` (and the VAE ceiling a lossless VAE)."""
    monkeypatch.setattr(evaluate, "vae_round_trip", lossless_vae)
    return lambda fn: monkeypatch.setattr(evaluate, "sample_images", fn)


def test_the_prompt_parser_reads_the_world_captions():
    for s in sample_scenes(50, 3, "heldout"):
        assert scene_from_prompt(caption(s)) == s


@pytest.mark.parametrize("split", ["seen", "heldout"])
def test_a_faithful_model_scores_everything(model, split):
    model(faithful)
    report = eval_base(None, split=split, n=40, seed=5)
    assert report.mode == ("base" if split == "seen" else "heldout") and report.n == 40
    assert report.accuracy == dict.fromkeys(("background", "color", "shape", "size", "position"), 1.0)
    assert [r.seed for r in report.rows] == list(range(5, 45))
    scenes = sample_scenes(40, 5, "pretrain" if split == "seen" else "heldout")
    for row, scene in zip(report.rows, scenes, strict=True):
        assert row.prompt == caption(scene, drop_size=False, drop_position=False)  # full canonical captions
        # The same verdict as judge_against, attribute for attribute.
        expected = judge_against(render(scene), scene)
        assert all(row.correct[k] == expected[k] for k in row.correct)
    if split == "heldout":
        assert set(report.by_group) <= {f"{c} {s}" for s, c in evaluate.HELD_OUT} and report.by_group


def test_a_model_that_misplaces_objects_loses_only_position(model):
    model(wrong_position)
    report = eval_base(None, n=40)
    assert report.accuracy["position"] == 0.0
    assert all(report.accuracy[m] == 1.0 for m in ("background", "color", "shape", "size"))


def test_subject_on_the_four_new_backgrounds(model):
    model(faithful)
    report = eval_subject(None, seeds=3, seed=10)
    assert report.n == 4 * 2 * 3 and report.accuracy == {"subject": 1.0, "background": 1.0}
    assert list(report.by_group) == list(EVAL_BACKGROUNDS) and report.by_group["white"]["subject"] == 1.0
    assert report.settings["seeds"] == [10, 11, 12]
    assert {r.prompt.split(", ")[-1] for r in report.rows} == set(POSITION_PHRASES.values())
    assert "a small sks star on a orange background, on the left" in [r.prompt for r in report.rows]

    # A model that draws its ordinary star for "sks star" has not learned the subject.
    model(
        lambda b, prompts, s, st: faithful(b, [p.replace("sks star", "purple star") for p in prompts], s, st)
    )
    assert eval_subject(None, seeds=3).accuracy == {"subject": 0.0, "background": 1.0}


def test_the_vae_ceiling_judges_the_target_scenes_after_the_vae(model, monkeypatch):
    model(faithful)
    report = eval_subject(None, seeds=2)
    assert report.ceiling == {"subject": 1.0, "background": 1.0}  # a lossless VAE loses nothing
    assert list(report.ceiling_by_group) == list(EVAL_BACKGROUNDS)
    assert "VAE ceiling" in report.format_table()
    assert eval_prior(None, seeds=1).ceiling == {}  # the class prompt names no single scene

    def loses_small_objects(base, scenes):  # a VAE that decodes small objects as plain background
        out = [render_array(s) for s in scenes]
        for scene, a in zip(scenes, out, strict=True):
            if scene.size == "small":
                a[:] = PALETTE[scene.background]
        return out

    monkeypatch.setattr(evaluate, "vae_round_trip", loses_small_objects)
    report = eval_subject(None, seeds=2)
    assert report.ceiling == {"subject": 0.5, "background": 1.0}
    assert report.accuracy == {"subject": 1.0, "background": 1.0}  # the images themselves are untouched


def test_vae_round_trip_on_the_tiny_base():
    from tuner.models.base import load_base

    scenes = [sks_scene("red", "large", "left"), sks_scene("white", "small", "center")]
    out = evaluate.vae_round_trip(load_base("tiny"), scenes)
    assert [a.shape for a in out] == [(64, 64, 3)] * 2 and all(a.dtype.name == "uint8" for a in out)
    assert [judge(a).background for a in out] == ["red", "white"]


def test_prior_with_and_without_an_adapter(model):
    model(faithful)
    without = eval_prior(None, seeds=2)
    assert without.n == 8 and without.accuracy == {"star": 1.0, "background": 1.0}
    assert [r.prompt for r in without.rows[:2]] == ["a star on a blue background"] * 2
    # An overfitted subject adapter draws the subject for every star: the prior is gone.
    model(lambda b, prompts, s, st: faithful(b, [p.replace("a star", "a sks star") for p in prompts], s, st))
    result = compare(without, eval_prior(None, seeds=2))
    assert result.drop == {"star": 1.0, "background": 0.0}
    assert "+100.0 pts" in result.format_table()
    assert json.loads(json.dumps(result.to_dict()))["drop"]["star"] == 1.0
    with pytest.raises(Exception, match="different prompts or seeds"):
        compare(without, eval_prior(None, seeds=2, seed=1))


def test_style_on_new_and_trained_shapes(model):
    model(faithful)
    report = eval_style(None, seeds=2)
    assert report.n == 16 and report.accuracy == {"outline": 1.0, "shape": 1.0, "color": 1.0}
    assert {r.prompt.split(" ")[3] for r in report.rows} == set(SHAPES)
    assert all(r.prompt.endswith(", outline style") for r in report.rows)
    assert "new: heart" in report.by_group and "trained: cross" in report.by_group
    # A model that ignores the style draws filled shapes: only the outline metric drops.
    model(lambda b, prompts, s, st: faithful(b, [p.removesuffix(", outline style") for p in prompts], s, st))
    assert eval_style(None, seeds=2).accuracy == {"outline": 0.0, "shape": 1.0, "color": 1.0}


def test_color_with_any_token(model):
    model(faithful)
    report = eval_color(None, token="<mypink>", seeds=2, shapes=("circle", "star"))
    assert report.n == 4 and report.accuracy == {"color": 1.0, "shape": 1.0}
    assert all("<mypink>" in r.prompt for r in report.rows)
    assert list(report.by_group) == ["trained: circle", "new: star"]
    # A model that does not know the token draws its ordinary colours: only the colour metric drops.
    model(lambda b, prompts, s, st: faithful(b, [p.replace("<pink> ", "") for p in prompts], s, st))
    assert run_eval("color", None, seeds=2).accuracy == {"color": 0.0, "shape": 1.0}


def test_report_is_json_and_a_table(model):
    model(faithful)
    report = run_eval("subject", None, seeds=1, settings=SampleSettings(steps=7, cfg=3.0, sampler="euler"))
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["settings"]["steps"] == 7 and doc["settings"]["sampler"] == "euler" and doc["n"] == 8
    assert doc["rows"][0]["judged"]["is_sks_subject"] is True and doc["rows"][0]["correct"]["subject"] is True
    table = report.format_table()
    assert (
        "subject" in table
        and "white" in table
        and "100.0%" in table
        and table.splitlines()[-1].startswith("all")
    )
    with pytest.raises(Exception, match="unknown eval mode"):
        run_eval("nope", None)


def _run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_eval_prior_runs_without_and_with_the_lora(model, monkeypatch, tmp_path):
    # The CLI's wiring, with a stand-in base and LoRA loader: the second base gets the LoRA applied.
    class FakeBase:
        def __init__(self):
            self.notes, self.adapted = [], False

        def to(self, device):
            return self

    bases: list[FakeBase] = []
    monkeypatch.setattr("tuner.models.base.load_base", lambda spec: bases.append(FakeBase()) or bases[-1])
    monkeypatch.setattr("tuner.sample.generate.load_loras_for", lambda base, specs: list(specs))
    monkeypatch.setattr(
        "tuner.sample.generate.apply_loras", lambda base, loras: setattr(base, "adapted", True)
    )

    def sampler(base, prompts, seeds, settings):
        swap = "a sks star" if base.adapted else "a star"
        return faithful(base, [p.replace("a star", swap) for p in prompts], seeds, settings)

    model(sampler)
    code, out, _ = _run_cli("eval", "--mode", "prior", "--seeds", "1", "--lora", "x.safetensors", "--json")
    doc = json.loads(out)
    assert code == 0 and [b.adapted for b in bases] == [False, True]
    assert doc["without"]["accuracy"]["star"] == 1.0 and doc["with"]["accuracy"]["star"] == 0.0
    assert doc["drop"]["star"] == 1.0


def test_cli_eval_smoke_on_the_tiny_base():
    code, out, err = _run_cli("eval", "--base", "tiny", "--mode", "base", "-n", "2", "--steps", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["mode"] == "base" and doc["n"] == 2 and len(doc["rows"]) == 2
    assert set(doc["accuracy"]) == {"background", "color", "shape", "size", "position"}
    assert doc["settings"]["steps"] == 2 and doc["settings"]["seeds"] == [0, 1]


def test_cli_world_is_deterministic(tmp_path):
    for name in ("a", "b"):
        code, out, _ = _run_cli("world", "--out", str(tmp_path / name), "-n", "5", "--seed", "3")
        assert code == 0 and "wrote 5 images" in out
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [f"{i:05d}.{ext}" for i in range(5) for ext in ("png", "txt")]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    _run_cli("world", "--out", str(tmp_path / "c"), "-n", "5", "--seed", "4")
    assert (tmp_path / "c" / "00000.png").read_bytes() != (tmp_path / "a" / "00000.png").read_bytes()

    code, out, _ = _run_cli("world", "--out", str(tmp_path / "sets"), "--personalization")
    assert code == 0 and {p.name for p in (tmp_path / "sets").iterdir()} == {
        "sks_star",
        "outline_style",
        "pink",
    }
    assert len(list((tmp_path / "sets" / "sks_star").glob("*.png"))) == 6 and "sks_star" in out

    code, _, err = _run_cli("world", "--out", str(tmp_path / "d"))
    assert code == 2 and "-n" in err
