"""Prior preservation with aspect-ratio buckets: the class images fill the instance buckets (each its share,
drawn at that bucket's size), every class batch comes from the bucket of the instance batch of the same step
(one UNet batch), and the prior loss is weighted over the class rows only, also when a bucket's last instance
batch is smaller than the batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_recipe
from PIL import Image
from test_buckets import write_shapes

from tuner.data.buckets import bucket_quotas, plan_buckets, plan_in_buckets
from tuner.data.dataset import TrainDataset
from tuner.data.folder import scan_dataset

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"))


def instance_dataset(folder: Path) -> TrainDataset:
    index = scan_dataset(folder)
    plan = plan_buckets([item.size for item in index.items], resolution=64, step=16)
    return TrainDataset(index, resolution=64, seed=1, flip=True, buckets=plan)


def write_class_images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (30 * i % 255, 90, 150)).save(folder / f"c{i}.png")
        (folder / f"c{i}.txt").write_text("a circle", encoding="utf-8")
    return folder


def test_quotas_split_the_class_images_in_proportion_at_least_one_each():
    counts = {(64, 64): 4, (80, 48): 2, (48, 80): 1, (32, 96): 1}
    assert bucket_quotas(counts, 8) == {(32, 96): 1, (48, 80): 1, (64, 64): 4, (80, 48): 2}
    # 4 over weights 4/2/1/1: 2, 1, 0.5, 0.5 -> the tie goes to the first bucket, the other gets its minimum one
    assert bucket_quotas(counts, 4) == {(32, 96): 1, (48, 80): 1, (64, 64): 2, (80, 48): 1}


def test_class_batches_follow_the_instance_bucket(shapes, tmp_path):
    instance = instance_dataset(shapes)
    # two per instance bucket, plus odd sizes that land in the nearest instance bucket
    sizes = [b for b in instance.buckets.buckets for _ in range(2)] + [(200, 190), (30, 100)]
    index = scan_dataset(write_class_images(tmp_path / "class", sizes))
    plan = plan_in_buckets([item.size for item in index.items], instance.buckets)
    assert set(plan.buckets) == set(instance.buckets.buckets)
    assert plan.bucket_of(index.items.index(next(i for i in index.items if i.size == (200, 190)))) == (64, 64)
    paired = TrainDataset(index, resolution=64, seed=2, buckets=plan, partner=instance)
    for k in range(12):
        mine, theirs = paired.batch_samples(k, 2), instance.batch_samples(k, 2)
        assert len(mine) == len(theirs)
        bucket = instance.size_of(instance.item_of(theirs[0][1]))
        assert {paired.size_of(paired.item_of(i)) for _, i in mine} == {bucket}
        assert len({i for _, i in mine}) == len(mine)  # no repeats while the bucket has enough class images
        assert paired.batch_samples(k, 2) == mine  # a pure function of (seed, k): resumes replay it
    with pytest.raises(ValueError, match="no image of this dataset is in the partner's bucket"):
        lacking = scan_dataset(write_class_images(tmp_path / "square", [(64, 64), (64, 64)]))
        TrainDataset(lacking, resolution=64, buckets=plan_in_buckets([i.size for i in lacking.items], instance.buckets),
                     partner=instance)


def test_bucketed_prior_preservation_trains(shapes, tmp_path, monkeypatch):
    from tuner.train import loop
    from tuner.train.setup import setup_run

    recipe = small_recipe(shapes, tmp_path / "out", train__steps=3, data__bucketing=True, prior__enabled=True,
                          prior__class_prompts=["a white circle"], prior__num_images=6, prior__steps=2,
                          prior__loss_weight=0.5)
    run = setup_run(recipe, **QUIET)
    # the cache is filled per instance bucket, at each bucket's size, in proportion (6 over 2/2/1/1)
    drawn = sorted((tmp_path / "out" / "class_images").glob("class_*.png"))
    sizes = [Image.open(p).size for p in drawn]
    assert {s: sizes.count(s) for s in set(sizes)} == {(64, 64): 2, (80, 48): 2, (48, 80): 1, (32, 96): 1}
    assert all(p.name.startswith(f"class_{w}x{h}_") for p, (w, h) in zip(drawn, sizes))
    assert run.class_dataset is not None and run.class_dataset.partner is run.dataset

    # the loss: instance rows' mean + loss_weight x class rows' mean, with a one-image instance batch
    k = next(k for k in range(20) if len(run.dataset.batch_samples(k, 2)) == 1)
    seen = {}

    def rows(pred, *args, **kwargs):
        seen["shape"] = tuple(pred.shape)
        return torch.arange(pred.shape[0], dtype=torch.float32)

    with monkeypatch.context() as m:
        m.setattr(loop, "diffusion_loss", rows)
        loss = loop.compute_loss(run, k, torch.Generator().manual_seed(0))
    bucket = run.dataset.size_of(run.dataset.item_of(run.dataset.batch_samples(k, 2)[0][1]))
    assert seen["shape"] == (2, 4, bucket[1] // 4, bucket[0] // 4)  # 1 instance + 1 class row, one bucket
    assert loss.item() == pytest.approx(0.0 + 0.5 * 1.0)

    result = loop.train(run, **QUIET)
    assert torch.isfinite(torch.tensor(run.history["loss"])).all() and len(run.history["loss"]) == 3
    assert {v[0].shape for v in run.class_latent_cache.values()} <= {v[0].shape for v in run.latent_cache.values()}
    assert result.outputs
