"""train.log_with: TensorBoard logging (when tensorboard is installed) and clear errors for missing packages."""

from __future__ import annotations

import pytest
from conftest import small_recipe

import tuner.train.tracking as tracking
from tuner.errors import TunerError

QUIET = {"log": lambda *_: None}


def test_tensorboard_gets_losses_learning_rates_previews_and_the_recipe(circles, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    recipe = small_recipe(circles, tmp_path, train__steps=3, train__log_with="tensorboard", preview__every=2,
                          preview__steps=2, preview__prompts=["a white circle"])
    run = setup_run(recipe, **QUIET)
    train(run, **QUIET)
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(tags["scalars"])
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx(run.history["loss"], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(run.history["lr"])
    assert [e.step for e in events.Images("preview")] == [2]
    assert any("recipe" in tag for tag in tags["tensors"])


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_clear_error_before_loading(circles, tmp_path, monkeypatch, kind):
    import tuner.train.setup as setup
    from tuner.train.validate import validate_recipe

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == kind else real(name, *a))
    monkeypatch.setattr(setup, "load_base", lambda *_: pytest.fail("the base was loaded"))
    recipe = small_recipe(circles, tmp_path, train__log_with=kind)
    with pytest.raises(TunerError, match=rf"train.log_with = '{kind}' needs the {kind} package: `pip install {kind}`"):
        setup.setup_run(recipe, **QUIET)
    assert any(f"needs the {kind} package" in p for p in validate_recipe(recipe).problems)


def test_none_records_nothing(tmp_path):
    tracker = tracking.open_tracker("none", tmp_path, name="x", recipe_toml="", config={})
    tracker.scalars(1, {"loss": 1.0})
    tracker.close()
    assert not (tmp_path / "logs").exists()
