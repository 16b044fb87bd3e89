"""The run report of ``tuner train``: written during training and at the end, and rendered by a real
browser (headless Chromium, installed by ``make test-deps`` from the distribution's packages)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import small_recipe

QUIET = {"log": lambda *_: None}


def chromium() -> str | None:
    """The Chromium (or Chrome) executable: ``$TUNER_CHROMIUM``, else the first one on PATH."""
    names = [os.environ.get("TUNER_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "chrome"]
    return next((found for name in names if name and (found := shutil.which(name))), None)


def rendered_body(page: Path) -> dict[str, str]:
    """The ``data-*`` attributes of ``<body>`` after Chromium loaded ``page`` and its check script ran."""
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (Debian: `make test-deps` as root, or apt-get install chromium); "
                    "set TUNER_CHROMIUM to use another binary")
    cmd = [exe, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={page.parent / '.chromium-profile'}",  # never the user's own profile
           "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:2000]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))


@pytest.fixture(scope="module")
def reported_run(circles, tmp_path_factory, monkeypatch_module):
    """A 4-step LoRA run with previews and checkpoints every 2 steps; every report write is recorded."""
    from tuner.train import run_report
    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    writes: list[tuple[dict[str, str], str]] = []
    real = run_report.write_report

    def recording(path, **kwargs):
        page = real(path, **kwargs)
        writes.append((dict(kwargs["facts"]), page.read_text(encoding="utf-8")))
        return page

    monkeypatch_module.setattr(run_report, "write_report", recording)
    out = tmp_path_factory.mktemp("reported")
    recipe = small_recipe(circles, out, train__steps=4, train__checkpoint_every=2, preview__every=2,
                          preview__steps=2, preview__prompts=["a white circle on a blue background"])
    run = setup_run(recipe, **QUIET)
    result = train(run, **QUIET)
    return run, result, writes


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_report_is_written_during_training_and_at_the_end(reported_run):
    run, result, writes = reported_run
    assert result.report == run.out_dir / "report.html" and result.report.is_file()
    # step 2: preview and checkpoint together give one write; step 4: preview, then the final page
    statuses = [facts["status"] for facts, _ in writes]
    assert statuses == ["training (step 2 of 4)", "training (step 4 of 4)", "finished: 4 steps"]
    first, _ = writes[0][0], writes[0][1]
    assert "http-equiv='refresh'" in writes[0][1] and "previews/step_000002.png" in writes[0][1]
    assert "step_000004.png" not in writes[0][1] and first["step"] == "2 / 4"
    final_facts, final = writes[-1]
    assert final == result.report.read_text(encoding="utf-8")
    assert "http-equiv='refresh'" not in final
    assert final.count("<svg") == 2 and "learning rate (steps 1-4)" in final
    assert "src='previews/step_000002.png'" in final and "src='previews/step_000004.png'" in final
    assert "[model]" in final and "Resolved recipe" in final  # the resolved recipe, escaped
    assert "words in all captions" in final and "<td>circle</td><td>4</td>" in final  # from the captions
    assert "tags in " in final and "4 images in 1 folder(s)" in final
    assert re.fullmatch(r"[\d.]+ s wall for 4 steps \([\d.e+-]+ steps/s, [\d.e+-]+ s/step\)", final_facts["time"])
    assert int(final_facts["peak memory (process RSS)"].split()[0]) > 50  # MiB; torch alone is more
    assert "peak CUDA memory allocated" not in final_facts  # CPU run
    assert not list(run.out_dir.glob(".*.tmp"))


def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    run, result, _ = reported_run
    body = rendered_body(result.report)
    assert body.get("checked") == "1", body  # the page's own check script ran after everything loaded
    images = len(re.findall(r"<img ", result.report.read_text(encoding="utf-8")))
    assert images == 2  # the two preview grids
    assert body["images-ok"] == str(images) and body["images-broken"] == "0"
    assert int(body["plot-lines"]) == 4  # loss, its moving average, learning rate, its (identity) average

    # the same page away from its folder: the check sees the images that do not load
    moved = tmp_path / "report.html"
    shutil.copy(result.report, moved)
    body = rendered_body(moved)
    assert body["images-ok"] == "0" and body["images-broken"] == str(images)


def test_a_report_that_cannot_be_written_does_not_stop_training(circles, tmp_path, monkeypatch, capsys):
    from tuner.formats.io import WriteError
    from tuner.train import run_report
    from tuner.train.loop import train
    from tuner.train.setup import setup_run

    def disk_full(path, **_kwargs):
        raise WriteError(f"cannot write '{path}': No space left on device")

    monkeypatch.setattr(run_report, "write_report", disk_full)
    run = setup_run(small_recipe(circles, tmp_path, train__steps=2, train__checkpoint_every=1), **QUIET)
    result = train(run, **QUIET)
    assert result.report is None and result.outputs[0].is_file()
    assert (tmp_path / "checkpoints" / "step_000002").is_dir()
    printed = capsys.readouterr()
    assert "could not write the run report" in printed.out + printed.err  # said above the progress bar
    assert "No space left on device; training goes on" in printed.out + printed.err
