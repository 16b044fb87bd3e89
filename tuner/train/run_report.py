"""The run report of ``tuner train``: ``report.html`` in the output folder (see :mod:`tuner.report`).

The loop rewrites it after each preview and checkpoint, when it stops and at the end, so a user can watch
a long run in a browser; each write is atomic and costs milliseconds (the previews are linked, not read).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tuner.data.captions import word_frequency
from tuner.report import write_report
from tuner.train.setup import Run

REFRESH_SECONDS = 30
"""How often a browser reloads the report of a run in progress."""


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes, or None where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def memory_facts(device: torch.device) -> dict[str, str]:
    """Peak memory so far: process RSS, and the CUDA allocator's peak on a CUDA device."""
    facts = {}
    rss = peak_rss_bytes()
    if rss is not None:
        facts["peak memory (process RSS)"] = f"{rss / 2**20:.0f} MiB"
    if device.type == "cuda":
        facts["peak CUDA memory allocated"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return facts


def previews_of(run: Run) -> list[tuple[str, Path]]:
    """The preview grids written so far (earlier sessions of a resumed run included), by step."""
    prompts = " | ".join(run.recipe.preview.prompts)
    return [(f"step {int(p.stem[5:])}: {prompts}", p)
            for p in sorted((run.out_dir / "previews").glob("step_*.png")) if p.stem[5:].isdigit()]


def write_run_report(
    run: Run,
    path: str | Path,
    *,
    step: int,
    seconds: float,
    status: str,
    title: str | None = None,
    images: Sequence[tuple[str, Path]] = (),
    evals: Mapping[str, str] | None = None,
    facts: Mapping[str, str] | None = None,
    live: bool = False,
) -> Path:
    """Write the report of ``run`` at ``step``, ``seconds`` of training into this process's session.

    ``images`` (e.g. the demo's before/after grid) come before the previews; ``facts`` are appended to the
    run's own (status, base, method, data, timing, memory). ``live``: the page reloads itself.
    """
    r, loss = run.recipe, run.history["loss"]
    done = step - run.start_step
    timing = f"{seconds:.1f} s wall for {done} steps"
    if done and seconds > 0:
        timing += f" ({done / seconds:.3g} steps/s, {seconds / done:.3g} s/step)"
    if live and done and step < r.train.steps:
        timing += f"; about {(r.train.steps - step) * seconds / done:.0f} s left"
    if run.start_step:
        timing += f"; resumed at step {run.start_step}"
    recent = [v for v in loss[-10:] if math.isfinite(v)]
    args = run.method.network_args(run.adapter)
    if "lora" in run.method.saves:
        args = {"rank": str(r.adapter.rank), "alpha": f"{r.adapter.alpha:g}", **args}
    settings = ", ".join(f"{k} {v}" for k, v in args.items())
    base = f"{r.model.base}" + (" (random stand-in)" if run.base.is_random else "")
    table = {
        "status": status,
        "step": f"{step} / {r.train.steps}",
        "base model": f"{base}, family {run.base.family.name}",
        "method": f"{run.method.name}: {settings}",
        "data": f"{run.index.num_images} images; {run.arithmetic.describe()}",
        "device": f"{run.device}, mixed precision {r.train.mixed_precision}",
        "time": timing,
        **memory_facts(run.device),
        "loss (mean of the last 10 steps)": f"{sum(recent) / len(recent):.4f}" if recent else "none yet",
        "prior preservation": (f"{len(run.class_dataset)} class images" if run.class_dataset is not None else "off"),
        **(facts or {}),
    }
    captions = [item.caption for item in run.index.items]
    frequencies = {f"tags in {folder}": counts for folder, counts in run.index.tag_frequency_by_folder().items()}
    frequencies["words in all captions"] = word_frequency(captions)
    resolution = r.data.resolution or run.base.family.resolution
    return write_report(
        path,
        title=title or f"tuner run: {r.output.name}",
        history=run.history,
        images={"Images": list(images), "Previews over training": previews_of(run)},
        recipe_toml=run.recipe_toml,
        facts=table,
        evals=evals,
        dataset=_dataset_summary(run, resolution),
        frequencies=frequencies,
        refresh_seconds=REFRESH_SECONDS if live else 0,
    )


def _dataset_summary(run, resolution: int) -> str:
    buckets = getattr(getattr(run, "dataset", None), "buckets", None)
    if buckets is None:
        return run.index.summary(resolution)
    return f"{run.index.summary(0)}; {buckets.summary()}"


class RunReport:
    """The loop's handle on ``<output.dir>/report.html``: times the session and rewrites the page.

    A failed write (a full disk) is logged and training goes on: the report is a view of the run, and the
    checkpoints are what must survive.
    """

    def __init__(self, run: Run, log=print):
        self.run, self.log = run, log
        self.path = run.out_dir / "report.html"
        self.started = time.perf_counter()
        self._last: tuple[int, str] | None = None

    def write(self, step: int, status: str | None = None) -> Path | None:
        """Rewrite the page at ``step``; ``status`` None means training is still going (the page reloads).
        A second write for the same step and status (a preview and a checkpoint together) is skipped."""
        if self._last == (step, status or ""):
            return self.path
        self._last = (step, status or "")
        live = status is None
        try:
            return write_run_report(
                self.run, self.path, step=step, seconds=time.perf_counter() - self.started, live=live,
                status=status or f"training (step {step} of {self.run.recipe.train.steps})",
            )
        except OSError as exc:
            self.log(f"could not write the run report {self.path}: {exc}; training goes on")
            return None
