"""Crash-safe writes: a failed write never leaves a half file under the final name, a disk that fills during
a checkpoint keeps the previous checkpoint, and an output folder that cannot be written stops a run early."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import small_recipe
from PIL import Image

import tuner.formats.io as io
import tuner.train.loop as loop
from tuner.errors import TunerError
from tuner.formats.io import WriteError, writable_folder_problem, write_bytes_atomic
from tuner.sample.png import save_png
from tuner.train.checkpoint import find_checkpoint, load_checkpoint
from tuner.train.setup import setup_run

QUIET = {"log": lambda *_: None}


def fill_disk_when(monkeypatch, predicate) -> list[str]:
    """Make every write whose file path satisfies ``predicate`` write half its bytes, then fail with ENOSPC."""
    real = io._write_all
    hits: list[str] = []

    def write_all(fh, data, *args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{fh.fileno()}")
        if predicate(path):
            hits.append(path)
            fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data, *args, **kwargs)

    monkeypatch.setattr(io, "_write_all", write_all)
    return hits


def hidden_files(folder) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    write_bytes_atomic(target, b"old contents")
    fill_disk_when(monkeypatch, lambda p: True)
    with pytest.raises(WriteError, match=r"cannot write '.*a\.bin': No space left on device \(errno 28\).*Free some "
                                         r"disk space") as err:
        write_bytes_atomic(target, b"new contents, longer")
    assert isinstance(err.value, TunerError) and isinstance(err.value, OSError)
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old contents"
    assert hidden_files(tmp_path) == []


def test_a_png_that_fails_to_encode_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    save_png(Image.new("RGB", (4, 4), (1, 2, 3)), path)

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(WriteError, match="No space left"):
        save_png(Image.new("RGB", (4, 4)), path)
    monkeypatch.undo()
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    assert hidden_files(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(circles, tmp_path, monkeypatch):
    recipe = small_recipe(circles, tmp_path, train__steps=6, train__checkpoint_every=2, output__save_dtype="fp32")
    run = setup_run(recipe, **QUIET)
    hits = fill_disk_when(monkeypatch, lambda p: "/.step_000004." in p and p.endswith(".tmp"))
    with pytest.raises(WriteError) as err:
        loop.train(run, **QUIET)
    message = str(err.value)
    assert hits, "the simulated failure never triggered"
    assert f"cannot save checkpoint '{tmp_path / 'checkpoints' / 'step_000004'}': No space left on device" in message
    assert f"the previous checkpoint '{tmp_path / 'checkpoints' / 'step_000002'}' is intact" in message
    assert "--resume latest" in message and "Free some disk space" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert find_checkpoint("latest", tmp_path).name == "step_000002"
    state = load_checkpoint(tmp_path / "checkpoints" / "step_000002")  # complete and readable
    assert state.step == 2 and state.trainable and all(torch.isfinite(t).all() for t in state.trainable.values())
    assert not (tmp_path / "t.safetensors").exists()


def test_cli_reports_a_failed_checkpoint_without_a_traceback(circles, tmp_path, monkeypatch, capsys):
    from tuner import cli
    from tuner.train import checkpoint

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors", no_space)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\npath = "{circles}"\n[train]\nsteps = 2\nbatch_size = 1\n'
                      f'[output]\ndir = "{tmp_path / "out"}"\n', encoding="utf-8")
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "error: cannot save checkpoint" in err and "there is no earlier checkpoint" in err
    assert "Traceback" not in err


def test_an_output_folder_under_a_file_stops_the_run_before_loading(circles, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    import tuner.train.setup as setup

    monkeypatch.setattr(setup, "load_base", lambda *_: pytest.fail("the base was loaded"))
    with pytest.raises(TunerError, match=r"output.dir = '.*file/out' cannot be written: '.*file' is a file"):
        setup_run(small_recipe(circles, blocker / "out"), **QUIET)


def test_a_read_only_output_folder_stops_the_run(circles, tmp_path, monkeypatch):
    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "TemporaryFile", read_only)
    with pytest.raises(TunerError, match=r"output.dir = '.*' cannot be written: '.*' is not writable "
                                         r"\(Read-only file system\)\. Pick a writable folder"):
        setup_run(small_recipe(circles, tmp_path / "out"), **QUIET)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_reported(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "is not writable" in (writable_folder_problem(locked / "out") or "")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_small_disk_that_fills_during_a_checkpoint(circles, tmp_path):
    """Not simulated: the output folder is a tmpfs with room for one checkpoint and a half."""
    import shutil
    import subprocess

    def recipe(out, steps):
        return small_recipe(circles, out, train__steps=steps, train__checkpoint_every=2, output__save_dtype="fp32")

    probe = tmp_path / "probe"
    loop.train(setup_run(recipe(probe, 2), **QUIET), **QUIET)
    one = sum(f.stat().st_size for f in (probe / "checkpoints" / "step_000002").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.6) + 256 * 1024}", "tmpfs", str(disk)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = setup_run(recipe(disk / "out", 6), **QUIET)
        with pytest.raises(WriteError) as err:
            loop.train(run, **QUIET)
        assert "No space left on device" in str(err.value)
        assert "the previous checkpoint" in str(err.value) and "step_000002' is intact" in str(err.value)
        state = load_checkpoint(disk / "out" / "checkpoints" / "step_000002")
        assert state.step == 2 and all(torch.isfinite(t).all() for t in state.trainable.values())
        assert find_checkpoint("latest", disk / "out").name == "step_000002"
        assert hidden_files(disk / "out" / "checkpoints") == []  # the half-written one was cleaned up
    finally:  # lazy: the run object may still hold a handle on the folder
        subprocess.run(["umount", "-l", str(disk)], check=True)
