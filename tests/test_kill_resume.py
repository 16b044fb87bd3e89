"""A run killed with SIGKILL and resumed from its last checkpoint ends with the same weights, bit for bit.

Each run is a real ``tuner train`` process (OMP_NUM_THREADS=1, so CPU kernels are deterministic). The
recipe turns on every source of randomness and state a resume has to restore: flips, caption dropout, LoRA
dropout, gradient accumulation, a cosine schedule with warm-up and EMA. The interrupted run is killed twice:

1. in the middle of step 5 (one micro-batch's gradient already accumulated), after ``step_000004`` landed;
2. after resuming from step 4, half-way through writing the tensors of checkpoint ``step_000008``, so a
   half-written temporary folder is left behind; ``--resume latest`` must take ``step_000006`` instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_circles
from safetensors.torch import load_file

STEPS = 10

RECIPE = """
[data]
path = "{data}"
flip = true
caption_dropout = 0.2
[adapter]
dropout = 0.1
[train]
steps = {steps}
batch_size = 1
gradient_accumulation = 2
checkpoint_every = 2
keep_checkpoints = 0
ema_decay = 0.9
seed = 3
[optim]
learning_rate = 1e-3
schedule = "cosine"
warmup_steps = 2
[output]
dir = "{out}"
name = "t"
save_dtype = "fp32"
"""

# Runs ``tuner train`` in this process, optionally parking it (so the test can SIGKILL it) at a chosen point:
# HANG=step:N   at the second micro-batch of step N (the first one's backward is done);
# HANG=write:N  half-way through the first file write of checkpoint step N.
DRIVER = r"""
import os, sys, time
from pathlib import Path
import tuner.formats.io as io
import tuner.train.loop as loop
from tuner.cli import main

kind, _, at = os.environ.get("HANG", "").partition(":")
marker = Path(os.environ["MARKER"]) if kind else None

def park():
    marker.write_text("parked")
    while True:
        time.sleep(1)

if kind == "step":
    real_loss = loop.compute_loss
    def compute_loss(run, micro_step, generator):
        if micro_step == (int(at) - 1) * 2 + 1:
            park()
        return real_loss(run, micro_step, generator)
    loop.compute_loss = compute_loss
elif kind == "write":
    real_write = io._write_all
    def write_all(fh, data, *args, **kwargs):
        if f"/.step_{int(at):06d}." in os.readlink(f"/proc/self/fd/{fh.fileno()}"):
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            park()
        return real_write(fh, data, *args, **kwargs)
    io._write_all = write_all
sys.exit(main(sys.argv[1:]))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses SIGKILL and /proc")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HANG", None)
    env.update(extra)
    return env


def _start(recipe: Path, *args: str, **env: str) -> subprocess.Popen:
    # cwd: the recipe's folder, not the repository (whose datasets/ folder would shadow the datasets package)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, "train", str(recipe), *args], cwd=recipe.parent,
        env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_when_parked(proc: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it was killed:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "run never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkilled_run_resumed_twice_ends_bit_identical(tmp_path):
    data = write_circles(tmp_path / "data")
    recipes = {}
    for name in ("full", "cut"):
        recipes[name] = tmp_path / f"{name}.toml"
        recipes[name].write_text(RECIPE.format(data=data, steps=STEPS, out=tmp_path / name), encoding="utf-8")
    ckpts = tmp_path / "cut" / "checkpoints"

    full = _start(recipes["full"])  # the uninterrupted run, alongside the first interrupted one
    cut = _start(recipes["cut"], HANG="step:5", MARKER=str(tmp_path / "parked1"))
    _kill_when_parked(cut, tmp_path / "parked1")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]

    cut = _start(recipes["cut"], "--resume", "latest", HANG="write:8", MARKER=str(tmp_path / "parked2"))
    _kill_when_parked(cut, tmp_path / "parked2")
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[1:] == ["step_000002", "step_000004", "step_000006"], names
    assert names[0].startswith(".step_000008."), names  # the half-written temporary folder
    assert not (tmp_path / "cut" / "t.safetensors").exists()

    out = _finish(_start(recipes["cut"], "--resume", "latest"))
    assert "resumed from" in out and "step_000006" in out
    _finish(full)

    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # stale temporary folder cleaned up
    expected = load_file(tmp_path / "full" / "t.safetensors")
    got = load_file(tmp_path / "cut" / "t.safetensors")
    assert expected.keys() == got.keys() and expected
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
    # the checkpoints at the end hold the same trained tensors, EMA and optimizer state too
    final_full = load_file(tmp_path / "full" / "checkpoints" / f"step_{STEPS:06d}" / "trainable.safetensors")
    final_cut = load_file(ckpts / f"step_{STEPS:06d}" / "trainable.safetensors")
    assert any(k.startswith("ema.") for k in final_full)
    assert all(torch.equal(final_full[k], final_cut[k]) for k in final_full)
