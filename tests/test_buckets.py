"""Aspect-ratio buckets: kohya's bucket maths, assignment, no-upscaling, deterministic one-bucket batches, and
short tiny-base trainings on images of mixed shapes (cached latents per bucket size, exact resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_recipe
from PIL import Image, ImageDraw

from tuner.data.buckets import (
    assign_bucket,
    bucket_settings,
    make_buckets,
    no_upscale_bucket,
    plan_buckets,
)
from tuner.data.dataset import TrainDataset
from tuner.data.folder import scan_dataset
from tuner.errors import RecipeError, TunerError

QUIET = {"log": lambda *_: None}

# kohya's buckets for --resolution 512 with its defaults (min 256, max 1024, step 64), by hand: for each width
# w = 256, 320, ..., 1024 the height is min(1024, floor(262144 / w / 64) * 64), in both orientations.
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_sd_buckets_match_kohyas_list():
    assert make_buckets(512, step=64, min_size=256, max_size=1024) == KOHYA_512
    assert bucket_settings(512, step=64) == (256, 1024)  # 0 = resolution / 2 and x 2: kohya's defaults
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in KOHYA_512)


def test_sdxl_and_tiny_buckets():
    xl = make_buckets(1024, step=64, min_size=512, max_size=2048)
    assert (1024, 1024) in xl and (832, 1216) in xl and (1216, 832) in xl and (512, 2048) in xl
    assert all(w * h <= 1024 * 1024 for w, h in xl)
    # tiny: step 16 (its family record), min 32, max 128; by hand as above with area 4096
    assert bucket_settings(64, step=16) == (32, 128)
    assert make_buckets(64, step=16, min_size=32, max_size=128) == [
        (32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32),
    ]


def test_assignment_takes_the_nearest_aspect_ratio_and_covers_it():
    b = KOHYA_512
    # 3:2 -> 640x384 (5:3, error 0.167) beats 576x448 (1.286, error 0.214); cover: scale 640/600
    a = assign_bucket((600, 400), b)
    assert a.bucket == (640, 384) and a.resized == (640, 427)
    assert assign_bucket((400, 600), b).bucket == (384, 640)
    assert assign_bucket((1000, 1000), b) == assign_bucket((300, 300), b)
    assert assign_bucket((1000, 1000), b).resized == (512, 512)
    assert assign_bucket((448, 576), b).resized == (448, 576)  # an exact bucket size is kept as is
    # 2:1 -> 704x320 (2.2) beats 640x384 (1.67); narrower than the bucket, so the width decides: 704/2000
    a = assign_bucket((2000, 1000), b)
    assert a.bucket == (704, 320) and a.resized == (704, 352)
    # 3:1 -> 832x256 (3.25, error 0.25) beats 768x320 (2.4, error 0.6); again the width decides: 832/900
    a = assign_bucket((900, 300), b)
    assert a.bucket == (832, 256) and a.resized == (832, 277)
    # wider than its bucket: the height decides. 5:2 -> 768x320 (2.4); scale 320/400
    a = assign_bucket((1000, 400), b)
    assert a.bucket == (768, 320) and a.resized == (800, 320)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones():
    # within the area: its own size, sides rounded down to the step (a crop, no resize)
    a = no_upscale_bucket((300, 200), resolution=512, step=64)
    assert a.bucket == (256, 192) and a.resized == (300, 200)
    a = no_upscale_bucket((100, 700), resolution=512, step=64)
    assert a.bucket == (64, 640) and a.resized == (100, 700)
    # larger than the area: scaled down to 512^2 keeping 2:1 (724 x 362), then the side whose rounding
    # distorts less is put on the step: height 320 -> width 640 (exactly 2:1)
    a = no_upscale_bucket((2000, 1000), resolution=512, step=64)
    assert a.bucket == (640, 320) and a.resized == (640, 320)
    # a side under one step becomes one step (the only enlargement)
    a = no_upscale_bucket((40, 300), resolution=512, step=64)
    assert a.bucket == (64, 256) and a.resized == (64, 480)
    plan = plan_buckets([(300, 200), (40, 300)], resolution=512, step=64, no_upscale=True)
    assert plan.upscaled() == [1] and "1 image(s) are upscaled" in plan.summary()


def test_bucket_sizes_are_checked_with_the_key_named():
    with pytest.raises(TunerError, match="data.min_bucket_reso = 576 is above the resolution 512"):
        bucket_settings(512, step=64, min_size=576)
    with pytest.raises(TunerError, match="data.max_bucket_reso = 1000 is not a multiple of the bucket step 64"):
        bucket_settings(512, step=64, max_size=1000)
    with pytest.raises(TunerError, match="data.max_bucket_reso = 448 is below the resolution"):
        bucket_settings(512, step=64, max_size=448)


def write_shapes(folder: Path) -> Path:
    """Images of mixed aspect ratios (tiny buckets: 64x64 x2, 80x48 x2, 48x80, 32x96), with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (128, 128), (96, 48), (120, 80), (48, 96), (40, 120)]
    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 70), (20, 20, 20), (200, 200, 40), (160, 40, 160)]
    for i, (size, rgb) in enumerate(zip(sizes, colours)):
        img = Image.new("RGB", size, rgb)
        w, h = size
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(245, 245, 245))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a white circle, picture {i}", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"))


def bucketed_dataset(folder: Path, seed: int = 0, repeats: int = 1) -> TrainDataset:
    index = scan_dataset(folder, default_repeats=repeats)
    plan = plan_buckets([item.size for item in index.items], resolution=64, step=16)
    return TrainDataset(index, resolution=64, seed=seed, flip=True, buckets=plan)


def test_examples_take_their_bucket_size(shapes):
    ds = bucketed_dataset(shapes)
    assert ds.buckets.counts() == {(32, 96): 1, (48, 80): 1, (64, 64): 2, (80, 48): 2}
    for i in range(len(ds)):
        example = ds.get(i, 0)
        w, h = ds.buckets.bucket_of(example.item_index)
        assert example.pixel_values.shape == (3, h, w)
        assert example.pixel_values.min() >= -1 and example.pixel_values.max() <= 1
        # SDXL conditioning: the file's (height, width) and the crop's (top, left) in the resized image
        fw, fh = ds.index.items[example.item_index].size
        assert example.original_size == (fh, fw)
    # 120x80 covers 80x48 at 80/120: resized 80x53, centre crop from top 2
    third = next(i for i in range(len(ds)) if ds.index.items[ds.item_of(i)].size == (120, 80))
    assert ds.get(third, 0).crop_top_left == (2, 0)
    # cached latents come from these very pixels
    e = ds.get(third, 0)
    assert torch.equal(ds.deterministic_example(e.item_index, e.flipped), e.pixel_values)


def test_batches_are_one_bucket_each_and_cover_the_epoch(shapes):
    ds = bucketed_dataset(shapes, repeats=3)  # 18 samples: buckets of 6, 3, 6, 3 -> 2+1+2+1 batches of <= 3
    assert ds.batches_per_epoch(3) == 6
    for epoch in range(3):
        batches = ds.epoch_batches(epoch, 3)
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
        for b in batches:
            assert len({ds.buckets.bucket_of(ds.item_of(i)) for i in b}) == 1 and 1 <= len(b) <= 3
    assert ds.epoch_batches(0, 3) != ds.epoch_batches(1, 3)
    # a pure function of (seed, micro step): a fresh dataset (a resumed run) draws the same batches
    again = bucketed_dataset(shapes, repeats=3)
    assert [ds.batch_samples(k, 3) for k in range(20)] == [again.batch_samples(k, 3) for k in range(20)]
    other = bucketed_dataset(shapes, seed=1, repeats=3)
    assert [ds.batch_samples(k, 3) for k in range(6)] != [other.batch_samples(k, 3) for k in range(6)]
    from tuner.train.batches import batch_at

    batch = batch_at(ds, 7, 3)
    assert batch.pixel_values.shape[0] == len(batch) == len(batch.original_sizes) == len(batch.crop_top_left)


def test_unbucketed_order_is_unchanged(shapes):
    """Without buckets micro-batches keep the stream of epoch permutations (old checkpoints resume exactly)."""
    index = scan_dataset(shapes)
    ds = TrainDataset(index, resolution=64, seed=3)
    n, expected = len(ds), []
    for pos in range(5 * 4):
        epoch, offset = divmod(pos, n)
        expected.append((epoch, ds.epoch_order(epoch)[offset]))
    assert [p for k in range(5) for p in ds.batch_samples(k, 4)] == expected


def test_recipe_keys_and_cli_options(shapes, tmp_path):
    from tuner.cli import _recipe_from_args, build_parser
    from tuner.config.load import load_recipe

    with pytest.raises(RecipeError, match="data.min_bucket_reso = 32 has no effect without data.bucketing"):
        load_recipe(None, ["data.min_bucket_reso=32"])
    both = load_recipe(None, ["data.bucketing=true", "prior.enabled=true", 'prior.class_prompts=["a circle"]'])
    assert both.data.bucketing and both.prior.enabled  # bucketed prior preservation: tests/test_prior_buckets.py
    with pytest.raises(RecipeError, match="data.bucket_step = 12"):
        load_recipe(None, ["data.bucketing=true", "data.bucket_step=12"])
    path = tmp_path / "r.toml"
    path.write_text("[train]\nsteps = 2\n")
    args = build_parser().parse_args(["train", str(path), "--bucketing", "--min-bucket-reso", "32",
                                      "--max-bucket-reso", "128", "--bucket-no-upscale"])
    r = _recipe_from_args(args).data
    assert (r.bucketing, r.min_bucket_reso, r.max_bucket_reso, r.bucket_no_upscale) == (True, 32, 128, True)


def test_validate_shows_the_bucket_summary(shapes, tmp_path, capsys):
    from tuner.cli import main

    path = tmp_path / "r.toml"
    path.write_text(f'[data]\npath = "{shapes}"\nbucketing = true\n[train]\nbatch_size = 2\n'
                    f'[output]\ndir = "{tmp_path / "out"}"\n')
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "buckets (width x height: images; step 16 px, sides 32-128 px): 32x96: 1, 48x80: 1, 64x64: 2, 80x48: 2" in out
    assert "(4 one-bucket batches)" in out
    assert main(["validate", str(path), "--min-bucket-reso", "80"]) == 2
    assert "data.min_bucket_reso = 80 is above the resolution 64" in capsys.readouterr().out


def test_bucketed_training_caches_per_bucket_and_resumes_exactly(shapes, tmp_path):
    from tuner.train.export import run_weights
    from tuner.train.loop import restore, train
    from tuner.train.setup import setup_run

    def recipe(out, steps, **changes):
        return small_recipe(shapes, out, train__steps=steps, data__bucketing=True, data__flip=True,
                            train__seed=5, **changes)

    logs: list[str] = []
    full = setup_run(recipe(tmp_path / "full", 6), log=logs.append)
    assert any(line.startswith("buckets (") and "80x48: 2" in line for line in logs)
    train(full, **QUIET)
    assert {v[0].shape for v in full.latent_cache.values()} == {(4, 24, 8), (4, 20, 12), (4, 16, 16), (4, 12, 20)}
    losses = torch.tensor(full.history["loss"])
    assert len(losses) == 6 and torch.isfinite(losses).all()
    assert "80x48: 2" in (tmp_path / "full" / "report.html").read_text()

    uncached = setup_run(recipe(tmp_path / "uncached", 6, train__cache_latents=False), **QUIET)
    train(uncached, **QUIET)
    assert uncached.history["loss"] == pytest.approx(full.history["loss"], rel=1e-4)

    first = setup_run(recipe(tmp_path / "part", 3, train__checkpoint_every=1), **QUIET)
    train(first, **QUIET)
    second = setup_run(recipe(tmp_path / "part", 6), **QUIET)
    restore(second, tmp_path / "part" / "checkpoints" / "step_000003", **QUIET)
    train(second, **QUIET)
    assert second.history["loss"] == full.history["loss"]
    a, b = run_weights(full).modules, run_weights(second).modules
    assert all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a)

    unbucketed = setup_run(small_recipe(shapes, tmp_path / "part", train__steps=6, train__seed=5, data__flip=True),
                           **QUIET)
    with pytest.raises(TunerError, match="data.bucketing"):
        restore(unbucketed, tmp_path / "part" / "checkpoints" / "step_000003", **QUIET)
