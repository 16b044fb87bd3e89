"""The numerical guard and clean stops on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import small_recipe

import tuner.train.loop as loop
from tuner.train.export import run_weights
from tuner.train.setup import setup_run

QUIET = {"log": lambda *_: None}


def ups(run):
    return {k: m.up.clone() for k, m in run_weights(run).modules.items()}


def test_non_finite_steps_are_skipped_then_training_stops(circles, tmp_path, monkeypatch):
    real = loop.compute_loss
    calls = []

    def poisoned(run, micro_step, generator):
        calls.append(micro_step)
        loss = real(run, micro_step, generator)
        return loss * float("nan") if micro_step >= 2 else loss

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    run = setup_run(small_recipe(circles, tmp_path, train__steps=20, train__checkpoint_every=2,
                                 train__max_bad_steps=3, optim__learning_rate=5e-3), **QUIET)
    with pytest.raises(loop.TrainingStopped, match=r"NaN/inf for 3 steps in a row") as err:
        loop.train(run, **QUIET)
    assert "step_000002" in str(err.value) and "learning_rate" in str(err.value)
    assert len(calls) == 5  # 2 good steps, then 3 bad ones
    # the weights after the bad steps equal those of the last good step (checkpoint at step 2)
    from tuner.train.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "checkpoints" / "step_000002").trainable
    for name, p in ((f"{c}.{n}", p) for c, m in run.trained.items() for n, p in m.named_parameters() if p.requires_grad):
        assert torch.equal(saved[name], p.detach().cpu()), name
    assert not (tmp_path / "checkpoints" / "step_000004").exists()
    page = (tmp_path / "report.html").read_text()  # the run report says why it stopped
    assert "stopped at step 5: 3 non-finite steps in a row" in page and "3 non-finite not drawn" in page


def test_a_single_bad_step_changes_nothing_and_training_goes_on(circles, tmp_path, monkeypatch):
    real = loop.compute_loss

    def once(run, micro_step, generator):
        loss = real(run, micro_step, generator)
        return loss * float("inf") if micro_step == 1 else loss

    monkeypatch.setattr(loop, "compute_loss", once)
    run = setup_run(small_recipe(circles, tmp_path, train__steps=3), **QUIET)
    result = loop.train(run, **QUIET)
    assert result.steps == 3 and len(run.history["loss"]) == 3
    assert not torch.isfinite(torch.tensor(run.history["loss"][1]))


def test_sigint_saves_a_checkpoint_and_the_resumed_run_ends_identical(circles, tmp_path, monkeypatch):
    full = setup_run(small_recipe(circles, tmp_path / "full", train__steps=5, output__save_dtype="fp32"), **QUIET)
    loop.train(full, **QUIET)

    real = loop.compute_loss

    def interrupt(run, micro_step, generator):
        if micro_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(run, micro_step, generator)

    monkeypatch.setattr(loop, "compute_loss", interrupt)
    recipe = small_recipe(circles, tmp_path / "cut", train__steps=5, output__save_dtype="fp32")
    run = setup_run(recipe, **QUIET)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / `cmd &`
    with pytest.raises(loop.TrainingStopped, match=r"SIGINT at step 3/5") as err:
        loop.train(run, **QUIET)
    assert err.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    assert "stopped at step 3 by SIGINT" in (tmp_path / "cut" / "report.html").read_text()
    monkeypatch.setattr(loop, "compute_loss", real)
    resumed = setup_run(small_recipe(circles, tmp_path / "cut", train__steps=5, output__save_dtype="fp32"), **QUIET)
    loop.restore(resumed, tmp_path / "cut" / "checkpoints" / "step_000003", **QUIET)
    loop.train(resumed, **QUIET)
    expected, got = ups(full), ups(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    page = (tmp_path / "cut" / "report.html").read_text()
    assert "finished: 5 steps" in page and "for 2 steps" in page and "resumed at step 3" in page
