"""DreamBooth prior preservation, EMA and the full fine-tune method, through the one training loop."""

from __future__ import annotations

import pytest
import torch
from conftest import small_recipe

from tuner.models.base import load_base
from tuner.train.loop import compute_loss, prepare_caches, restore, train
from tuner.train.setup import setup_run

QUIET = {"log": lambda *_: None}


def prior_recipe(circles, out, **changes):
    settings = {"prior__enabled": True, "prior__class_prompts": ["a red circle on a blue background"],
                "prior__num_images": 3, "prior__steps": 2, **changes}
    return small_recipe(circles, out, **settings)


def test_class_images_are_generated_once_and_reused(circles, tmp_path):
    messages = []
    run = setup_run(prior_recipe(circles, tmp_path), log=messages.append)
    folder = tmp_path / "class_images"
    pngs = sorted(folder.glob("class_*.png"))
    assert [p.name for p in pngs] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert (folder / "class_00001.txt").read_text().strip() == "a red circle on a blue background"
    assert len(run.class_dataset) == 3
    stamps = [p.stat().st_mtime_ns for p in pngs]
    messages.clear()
    setup_run(prior_recipe(circles, tmp_path), log=messages.append)
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("class_*.png"))] == stamps
    assert any("reusing 3 class images" in m for m in messages)
    # asking for more generates only the missing ones, with the seeds a single run would have used
    setup_run(prior_recipe(circles, tmp_path, prior__num_images=4), **QUIET)
    assert len(list(folder.glob("class_*.png"))) == 4
    assert [p.stat().st_mtime_ns for p in pngs] == stamps


def test_class_images_drawn_in_batches_keep_their_names_prompts_and_seeds(circles, tmp_path):
    """prior.batch_size: the same files as one at a time (names, captions, seeds, pixels within one level),
    and a user's own image still counts towards num_images."""
    import numpy as np
    from PIL import Image

    def read_parameters(png):
        with Image.open(png) as image:
            return image.info["parameters"]

    prompts = ["a red circle on a blue background", "a white square on a black background"]
    one, batched = tmp_path / "one", tmp_path / "batched"
    for folder, size in ((one, 1), (batched, 2)):
        folder.mkdir()
        Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "class_00001.png")  # the user's own
        (folder / "class_00001.txt").write_text("a circle")
        setup_run(prior_recipe(circles, tmp_path / folder.name, prior__class_dir=str(folder),
                               prior__class_prompts=prompts, prior__num_images=5, prior__batch_size=size), **QUIET)
    names = ["class_00000.png", "class_00001.png", "class_00002.png", "class_00003.png", "class_00004.png"]
    assert sorted(p.name for p in batched.glob("class_*.png")) == names
    for name in names[:1] + names[2:]:
        a, b = one / name, batched / name
        assert read_parameters(a) == read_parameters(b)
        assert "Seed: " + str(int(name[6:11])) in read_parameters(b)
        assert (b.with_suffix(".txt")).read_text().strip() == prompts[int(name[6:11]) % 2]
        assert np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int)).max() <= 1


def test_class_images_from_another_base_or_prompt_are_drawn_again(circles, tmp_path):
    from PIL import Image

    from tuner.sample.png import save_png
    from tuner.train.prior import _drop_stale, drawn_by

    run = setup_run(prior_recipe(circles, tmp_path), **QUIET)
    folder = tmp_path / "class_images"
    mine = run.base.fingerprint()
    drawn = [drawn_by(p) for p in sorted(folder.glob("class_*.png"))]
    assert drawn == [(mine, "a red circle on a blue background")] * 3
    stale = folder / "class_00001.png"
    with Image.open(stale) as image:  # as if an older base had drawn it
        save_png(image.copy(), stale, parameters=image.info["parameters"].replace(mine, "0123456789ab"))
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "user.png")  # the user's own image: no fingerprint
    (folder / "user.txt").write_text("a red circle on a blue background")
    keep = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p != stale}
    messages = []
    setup_run(prior_recipe(circles, tmp_path, prior__num_images=4), log=messages.append)
    assert any("deleted 1 class images" in m and "0123456789ab" in m for m in messages)
    assert drawn_by(stale)[0] == mine
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p != stale} == keep
    # a new class prompt: the images drawn from the old one are drawn again from it; the user's image stays
    messages.clear()
    setup_run(prior_recipe(circles, tmp_path, prior__num_images=4,
                           prior__class_prompts=["a green circle on a blue background"]), log=messages.append)
    assert any("deleted 3 class images" in m and "no longer in prior.class_prompts" in m for m in messages)
    assert {drawn_by(p) for p in folder.glob("class_*.png")} == {(mine, "a green circle on a blue background")}
    assert (folder / "user.png").exists() and len(list(folder.glob("*.png"))) == 4
    # no class prompts: nothing could be redrawn, so stale images are reported and kept
    messages.clear()
    _drop_stale(folder, "ffffffffffff", [], messages.append)
    assert len(list(folder.glob("*.png"))) == 4 and any(m.startswith("WARNING") and "3 drawn by another base" in m
                                                        for m in messages)


def test_base_fingerprint_follows_the_weights(tmp_path):
    from tuner.models.base import export_base

    a, b = load_base("tiny"), load_base("tiny")
    assert a.fingerprint() == b.fingerprint()
    assert load_base(str(export_base(a, tmp_path / "copy"))).fingerprint() == a.fingerprint()
    with torch.no_grad():
        b.unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert b.fingerprint() != a.fingerprint()


def test_prior_loss_is_added_with_its_weight(circles, tmp_path):
    def loss(weight):
        run = setup_run(prior_recipe(circles, tmp_path, prior__loss_weight=weight), **QUIET)
        prepare_caches(run, **QUIET)
        with torch.no_grad():
            return compute_loss(run, 0, torch.Generator().manual_seed(5)).item()

    l0, l1, l2 = loss(0.0), loss(1.0), loss(2.0)
    assert l1 > l0 and abs((l2 - l1) - (l1 - l0)) < 1e-5 * max(1.0, l2)


def test_prior_preservation_changes_training(circles, tmp_path):
    def final(out, prior):
        make = prior_recipe if prior else small_recipe
        run = setup_run(make(circles, out, train__steps=3, output__save_dtype="fp32"), **QUIET)
        train(run, **QUIET)
        return run.history["loss"]

    assert final(tmp_path / "a", True) != final(tmp_path / "b", False)


def test_ema_is_what_gets_exported_and_resumes_exactly(circles, tmp_path):
    from tuner.train.export import run_weights

    recipe = small_recipe(circles, tmp_path / "full", train__steps=6, train__ema_decay=0.9,
                          optim__learning_rate=5e-3, output__save_dtype="fp32")
    run = setup_run(recipe, **QUIET)
    train(run, **QUIET)
    live = {k: m.up.clone() for k, m in run_weights(run).modules.items()}
    with run.ema.applied():
        averaged = {k: m.up.clone() for k, m in run_weights(run).modules.items()}
    assert any(not torch.equal(live[k], averaged[k]) for k in live), "the EMA should differ from the live weights"
    after = {k: m.up for k, m in run_weights(run).modules.items()}
    assert all(torch.equal(live[k], after[k]) for k in live), "the live weights come back after the EMA block"

    from tuner.adapters.lora import candidate_keys
    from tuner.formats.kohya import kohya_name_table
    from tuner.formats.lorafile import load_lora

    table = kohya_name_table(run.base.family, candidate_keys({"unet": run.base.unet}))
    exported = load_lora(tmp_path / "full" / "t.safetensors", name_table=table)
    for key, up in averaged.items():
        assert torch.equal(exported.modules[key].up, up)

    # interrupted at step 3, resumed: same EMA as the uninterrupted run
    half = small_recipe(circles, tmp_path / "half", train__steps=6, train__ema_decay=0.9,
                        optim__learning_rate=5e-3, output__save_dtype="fp32", train__checkpoint_every=3)
    first = setup_run(half, **QUIET)
    first.recipe.train.steps = 3
    train(first, **QUIET)
    half.train.steps = 6
    resumed = setup_run(half, **QUIET)
    restore(resumed, tmp_path / "half" / "checkpoints" / "step_000003", **QUIET)
    train(resumed, **QUIET)
    for name, tensor in run.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], tensor), name


def test_dreambooth_trains_every_unet_weight_and_nothing_else(circles, tmp_path):
    run = setup_run(small_recipe(circles, tmp_path, adapter__method="dreambooth", train__steps=2,
                                 optim__learning_rate=1e-4), **QUIET)
    n_trainable = sum(p.numel() for p in run.base.unet.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in run.base.unet.parameters())
    train(run, **QUIET)
    fresh = load_base("tiny")
    unet_changed = [n for n, p in fresh.unet.state_dict().items()
                    if not torch.equal(p, run.base.unet.state_dict()[n])]
    assert len(unet_changed) > 0.5 * len(fresh.unet.state_dict())
    for component in ("text_encoder", "vae"):
        for name, tensor in getattr(fresh, component).state_dict().items():
            assert torch.equal(getattr(run.base, component).state_dict()[name], tensor), f"{component}.{name}"
    folder = tmp_path / "model"
    assert (folder / "model_index.json").exists() and (folder / "unet").is_dir()
    tuned = load_base(str(folder))
    for name, tensor in tuned.unet.state_dict().items():
        assert torch.equal(tensor, run.base.unet.state_dict()[name]), name
    assert (tmp_path / "t.safetensors").exists()
    assert "retained" in (tmp_path / "t.extract.txt").read_text()


@pytest.fixture(scope="module")
def zz_circles(tmp_path_factory):
    """The circles with the placeholder ``<zz>`` in every caption."""
    from conftest import write_circles

    folder = write_circles(tmp_path_factory.mktemp("zz"))
    for txt in folder.glob("*.txt"):
        txt.write_text(txt.read_text().replace("white circle", "<zz> circle"))
    return folder


def ti_recipe(circles, out, **changes):
    settings = {"adapter__method": "textual_inversion", "embedding__tokens": ["<zz>"],
                "embedding__init_words": ["red"], "embedding__vectors": 2, "embedding__learning_rate": 5e-2,
                "train__steps": 4, "output__save_dtype": "fp32", **changes}
    return small_recipe(circles, out, **settings)


def test_textual_inversion_trains_only_the_new_rows(zz_circles, tmp_path):
    from tuner.formats.embeddings import read_embedding

    run = setup_run(ti_recipe(zz_circles, tmp_path), **QUIET)
    embedding = run.trained["embedding"]
    start = embedding.vectors("<zz>").clone()
    assert torch.equal(start[0], start[1])
    train(run, **QUIET)
    fresh = load_base("tiny")
    te_now = {k: v for k, v in run.base.text_encoder.state_dict().items() if not k.endswith(".rows")}
    for name, tensor in fresh.text_encoder.state_dict().items():
        key = name if name in te_now else name.replace("token_embedding.weight", "token_embedding.original.weight")
        assert torch.equal(te_now[key], tensor), f"text_encoder.{name} changed"
    for component in ("unet", "vae"):
        for name, tensor in getattr(fresh, component).state_dict().items():
            assert torch.equal(getattr(run.base, component).state_dict()[name], tensor), f"{component}.{name}"
    learned = embedding.vectors("<zz>")
    assert not torch.equal(learned, start)
    kohya = read_embedding(tmp_path / "embeddings" / "zz.safetensors", token="<zz>")
    diffusers = read_embedding(tmp_path / "embeddings" / "zz.diffusers.safetensors")
    assert diffusers.token == "<zz>"
    for data in (kohya, diffusers):
        (vectors,) = data.vectors.values()
        assert torch.equal(vectors, learned)


def test_textual_inversion_resumes_exactly(zz_circles, tmp_path):
    full = setup_run(ti_recipe(zz_circles, tmp_path / "full"), **QUIET)
    train(full, **QUIET)
    recipe = ti_recipe(zz_circles, tmp_path / "half", train__checkpoint_every=2)
    first = setup_run(recipe, **QUIET)
    first.recipe.train.steps = 2
    train(first, **QUIET)
    resumed = setup_run(ti_recipe(zz_circles, tmp_path / "half", train__checkpoint_every=2), **QUIET)
    restore(resumed, tmp_path / "half" / "checkpoints" / "step_000002", **QUIET)
    train(resumed, **QUIET)
    assert torch.equal(resumed.trained["embedding"].vectors("<zz>"), full.trained["embedding"].vectors("<zz>"))


def test_pivotal_writes_lora_embeddings_and_an_a1111_bundle(zz_circles, tmp_path):
    from tuner.formats.io import read_safetensors

    run = setup_run(ti_recipe(zz_circles, tmp_path, adapter__method="pivotal", embedding__a1111_bundle=True), **QUIET)
    assert set(run.trained) == {"embedding", "unet"}
    start = run.trained["embedding"].vectors("<zz>")
    result = train(run, **QUIET)
    assert not torch.equal(run.trained["embedding"].vectors("<zz>"), start), "the token vectors should train"
    names = sorted(p.name for p in result.outputs)
    assert names == ["README.md", "t.bundle.safetensors", "t.safetensors", "t.toml", "zz.diffusers.safetensors",
                     "zz.safetensors"]
    lora, meta = read_safetensors(tmp_path / "t.safetensors")
    bundle, _ = read_safetensors(tmp_path / "t.bundle.safetensors")
    assert set(bundle) - set(lora) == {"bundle_emb.<zz>.string_to_param.*"}
    assert torch.equal(bundle["bundle_emb.<zz>.string_to_param.*"], run.trained["embedding"].vectors("<zz>"))
    assert "<zz>" in meta.get("modelspec.trigger_phrase", "")


def test_a_token_no_caption_uses_is_refused_before_loading(circles, tmp_path):
    from tuner.errors import TunerError

    with pytest.raises(TunerError, match=r"appear in none of the 4 captions"):
        setup_run(ti_recipe(circles, tmp_path), base=object(), **QUIET)
