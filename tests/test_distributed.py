"""Data-parallel training (``tuner.train.distributed``): 2 processes x batch 1 train the same weights as
1 process x batch 2, and checkpoints resume across process counts.

The two-process runs are real ``tuner train --processes 2`` command lines executed by 2 CPU workers under
``torch.distributed.run`` (gloo), OMP_NUM_THREADS=1, cwd = tmp_path (the repo's ``datasets/`` folder would
shadow the ``datasets`` package). The recipe turns on every per-sample random draw and the paths that mix
them: flips, caption dropout, noise offset, min-SNR, gradient accumulation, prior preservation (instance and
class rows of one draw). Tolerances: float32 sums taken in another order, then AdamW, which turns tiny
gradient differences into at most a few 1e-6 here; a wrong shard or an unshared draw moves weights by the
order of the learning rate (1e-3) per step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_circles
from safetensors import safe_open
from safetensors.torch import load_file

from tuner.train.distributed import Shard, check_launch

ATOL = 1e-4  # weights (measured: 1.2e-5); one AdamW step moves a weight by up to lr = 1e-3
RTOL = 1e-4  # losses

RECIPE = """
[data]
path = "{data}"
flip = true
caption_dropout = 0.3
[prior]
enabled = true
class_prompts = ["a white circle"]
num_images = 3
steps = 2
[train]
steps = 4
batch_size = {batch}
gradient_accumulation = 2
checkpoint_every = 2
keep_checkpoints = 0
seed = 7
noise_offset = 0.05
min_snr_gamma = 5.0
[optim]
learning_rate = 1e-3
[output]
dir = "{out}"
name = "t"
save_dtype = "fp32"
"""

# Each worker runs two `tuner train --processes 2` command lines in turn (one launch, to keep the test short):
# a fresh run, and a run resumed from the checkpoint a 1-process run saved, with everything sharded between
# the processes: the optimizer's states and the gradients (optim.shard_gradients, ZeRO-2, which implies
# ZeRO-1's shard_states) and the frozen UNet weights (train.shard_frozen), with a preview (which then every
# process samples).
DRIVER = """
import sys
from tuner.cli import main

fresh, resumed, checkpoint = sys.argv[1:]
code = main(["train", fresh, "--processes", "2"])
sys.exit(code or main(["train", resumed, "--processes", "2", "--resume", checkpoint, "--set", "optim.shard_gradients=true",
                      "--set", "train.shard_frozen=true", "--set", "preview.every=2",
                      "--set", 'preview.prompts=["a white circle"]', "--set", "preview.steps=2"]))
"""


def recipe_file(folder: Path, data: Path, out: Path, batch: int) -> Path:
    path = folder / f"{out.name}.toml"
    path.write_text(RECIPE.format(data=data, out=out, batch=batch), encoding="utf-8")
    return path


def train_here(recipe: Path, resume: Path | None = None) -> None:
    """One process, in this pytest process, on one thread like the workers (OMP_NUM_THREADS=1): float sums
    split over another number of threads round differently, and the class images are compared byte for byte."""
    from tuner.config.load import load_recipe
    from tuner.train.loop import restore, train
    from tuner.train.setup import setup_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = setup_run(load_recipe(recipe, (), {}), log=lambda *_: None)
        if resume is not None:
            restore(run, resume, log=lambda *_: None)
        train(run, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors")


def losses(out: Path, step: int) -> list[float]:
    state = torch.load(out / "checkpoints" / f"step_{step:06d}" / "state.pt", weights_only=True)
    return state["history"]["loss"]


def optimizer_state(out: Path, step: int) -> dict[int, dict[str, torch.Tensor]]:
    state = torch.load(out / "checkpoints" / f"step_{step:06d}" / "state.pt", weights_only=True)
    return state["optimizer"]["state"]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= ATOL, f"weights differ by up to {worst:.3g} (allowed {ATOL})"


def test_two_processes_train_like_one_with_the_whole_batch_and_resume_across_counts(tmp_path):
    data = write_circles(tmp_path / "data")
    # 1 process x batch 2: the reference, with checkpoints at steps 2 and 4
    one = recipe_file(tmp_path, data, tmp_path / "one", batch=2)
    train_here(one)
    # 2 processes x batch 1, from scratch; and from the 1-process checkpoint at step 2
    two = recipe_file(tmp_path, data, tmp_path / "two", batch=1)
    two_resumed = recipe_file(tmp_path, data, tmp_path / "two_resumed", batch=1)
    (tmp_path / "driver.py").write_text(DRIVER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "driver.py",
            str(two),
            str(two_resumed),
            str(tmp_path / "one" / "checkpoints" / "step_000002"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-20000:]
    # only the main process logs (and shows progress): one arithmetic line per run
    arithmetic = [line for line in proc.stdout.splitlines() if line.startswith("step arithmetic")]
    assert len(arithmetic) == 2 and all(
        "batch 1 x accumulation 2 x 2 processes = 4 samples" in a for a in arithmetic
    )
    assert proc.stdout.count("resumed from") == 1
    # the class images were drawn once, by the main process, and are the ones the 1-process run drew
    for name in ("class_00000.png", "class_00002.png"):
        assert (tmp_path / "two" / "class_images" / name).read_bytes() == (
            tmp_path / "one" / "class_images" / name
        ).read_bytes()

    for step in (2, 4):
        assert_same(weights(tmp_path / "two", step), weights(tmp_path / "one", step))
        assert losses(tmp_path / "two", step) == pytest.approx(losses(tmp_path / "one", step), rel=RTOL)
    assert_same(load_file(tmp_path / "two" / "t.safetensors"), load_file(tmp_path / "one" / "t.safetensors"))
    for run in ("one", "two"):  # kohya's total batch counts every process: 2 x 1 x 2 and 1 x 2 x 2
        with safe_open(tmp_path / run / "t.safetensors", "pt") as f:
            assert f.metadata()["ss_total_batch_size"] == "4"
    # 1 -> 2 processes with sharded optimizer states: each process held part of them (loaded from the
    # 1-process checkpoint); the same weights at step 4, and the states gathered into the checkpoint are the
    # 1-process run's
    sharding = [line for line in proc.stdout.splitlines() if line.startswith("optimizer states sharded")]
    assert len(sharding) == 1 and "ZeRO stage 2" in sharding[0], proc.stdout[-3000:]
    mine, total = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) of the ([\d,]+)", sharding[0])[0])
    assert 0 < mine < total
    # ZeRO-2: the gradients were sent during backward and dropped where not owned, so process 0 never held
    # them all (measured on its .grad tensors before each bucket went; unsharded it holds all of them)
    held = [line for line in proc.stdout.splitlines() if line.startswith("gradients sharded")]
    assert len(held) == 1, proc.stdout[-3000:]
    peak, every = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) of the ([\d,]+)", held[0])[0])
    assert every == total and 0 < peak <= 0.75 * total, held[0]
    # the frozen UNet weights: process 0 kept half of them (and the last part's padding); the run's preview
    # (sampled by both processes, each layer gathering its weight) was written once, by process 0
    frozen = [line for line in proc.stdout.splitlines() if line.startswith("frozen UNet weights sharded")]
    assert len(frozen) == 1, proc.stdout[-3000:]
    kept, whole = (int(n.replace(",", "")) for n in re.findall(r"keeps ([\d,]+) of their ([\d,]+)", frozen[0])[0])
    assert whole > 5_000_000 and whole / 2 <= kept <= whole / 2 + 1000, frozen[0]
    assert (tmp_path / "two_resumed" / "previews" / "step_000004.png").is_file()
    assert_same(weights(tmp_path / "two_resumed", 4), weights(tmp_path / "one", 4))
    got, want = optimizer_state(tmp_path / "two_resumed", 4), optimizer_state(tmp_path / "one", 4)
    assert got.keys() == want.keys() and len(want) == len(weights(tmp_path / "one", 4))
    for i in want:
        assert want[i]["step"] == got[i]["step"] == 4
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got[i][name], want[i][name], rtol=1e-3, atol=1e-7), (i, name)
    # 2 -> 1 process: the 2-process checkpoint of step 2 continues in one process with batch 2
    back = recipe_file(tmp_path, data, tmp_path / "back", batch=2)
    shutil.copytree(tmp_path / "one" / "class_images", tmp_path / "back" / "class_images")
    train_here(back, resume=tmp_path / "two" / "checkpoints" / "step_000002")
    assert_same(weights(tmp_path / "back", 4), weights(tmp_path / "one", 4))
    assert losses(tmp_path / "back", 4) == pytest.approx(losses(tmp_path / "one", 4), rel=RTOL)


def test_each_process_keeps_its_rows_of_the_global_draw():
    """Concatenating the processes' draws (part by part) gives the one-process draw of the global batch."""
    parts = (2, 3)  # instance rows, class rows of one process
    want_n = torch.randn((10, 4, 2, 2), generator=torch.Generator().manual_seed(1))
    want_t = torch.randint(0, 1000, (10,), generator=torch.Generator().manual_seed(1))
    got_n, got_t = [], []
    for rank in range(2):
        shard = Shard(rank, 2)
        got_n.append(shard.randn((5, 4, 2, 2), torch.Generator().manual_seed(1), parts))
        got_t.append(shard.randint(1000, 5, torch.Generator().manual_seed(1), parts))
    layout = [got_n[0][:2], got_n[1][:2], got_n[0][2:], got_n[1][2:]]  # instance blocks, then class blocks
    assert torch.equal(torch.cat(layout), want_n)
    assert torch.equal(torch.cat([got_t[0][:2], got_t[1][:2], got_t[0][2:], got_t[1][2:]]), want_t)
    # one process: exactly torch's own draw (single-process runs are unchanged)
    assert torch.equal(Shard().randn((10, 4, 2, 2), torch.Generator().manual_seed(1)), want_n)


def test_processes_tile_the_global_micro_batch(tmp_path):
    """Micro-batch k of W processes x batch b = micro-batch k of one process x batch W*b, across epochs."""
    from tuner.data.dataset import TrainDataset
    from tuner.data.folder import scan_dataset

    dataset = TrainDataset(scan_dataset(write_circles(tmp_path / "d")), resolution=64, seed=3)
    for k in range(7):  # 4 samples: global batches of 6 run across epoch boundaries
        whole = dataset.batch_samples(k, 6)
        parts = [dataset.batch_samples(Shard(r, 3).micro_batch(k), 2) for r in range(3)]
        assert parts[0] + parts[1] + parts[2] == whole


@pytest.mark.parametrize(
    ("kind", "world", "device", "fused", "message"),
    [
        ("FSDP", 2, "auto", False, "does not support yet"),
        ("DEEPSPEED", 2, "auto", False, "does not support yet"),
        ("MULTI_GPU", 2, "cuda:1", False, "need one each"),
        ("MULTI_CPU", 2, "auto", True, "fused_backward"),
    ],
)
def test_unsupported_launches_are_refused(kind, world, device, fused, message):
    from tuner.errors import TunerError

    with pytest.raises(TunerError, match=message):
        check_launch(kind, world=world, device_spec=device, fused_backward=fused)
    check_launch("NO", world=1, device_spec=device, fused_backward=fused)  # one process: all allowed


def test_processes_option_relaunches_through_torchrun(tmp_path, monkeypatch, capsys):
    import tuner.train.launch as launch
    from tuner.cli import main

    recipe = recipe_file(tmp_path, write_circles(tmp_path / "data"), tmp_path / "out", batch=1)
    started = []

    class FakeLauncher:
        def __init__(self, command, env):
            started.append((command, env))

        def wait(self):
            return 0

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch.subprocess, "Popen", FakeLauncher)
    assert main(["train", str(recipe), "--processes", "2", "--steps", "3"]) == 0
    ((command, env),) = started
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert command[6:] == ["tuner.cli", "train", str(recipe), "--processes", "2", "--steps", "3"]
    assert env["OMP_NUM_THREADS"]
    # inside a launcher, a different count is a mistake
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(recipe), "--processes", "3"]) == 2
    assert "inside a launcher that started 2" in capsys.readouterr().err


def test_step_arithmetic_counts_every_process():
    from tuner.train.setup import StepArithmetic

    arithmetic = StepArithmetic(
        images=8, samples_per_epoch=8, batch_size=2, accumulation=1, steps=8, processes=2
    )
    assert arithmetic.samples_per_step == 4 and arithmetic.epochs == 4.0
    assert "batch 2 x accumulation 1 x 2 processes = 4 samples per step" in arithmetic.describe()
