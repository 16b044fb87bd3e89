"""GPU benchmark: peak memory and seconds per step of a LoRA on full-size SD1.5 (512 px) and SDXL (1024 px).

Status: run on an NVIDIA H100 80GB HBM3 on 2026-11-28 (torch 2.11.0+cu130; rows in
bench/results/gpu_nvidia-h100-80gb-hbm3_2026-11-28.json, README "GPU benchmark"). Run it whenever a GPU is
available and record the card and the table.

Each configuration runs in its own child process: a full-size architecture with random weights, built on the
device (``tuner.models.random_base``), LoRA rank 16 on the attention projections, batch 1, bf16 autocast
with the frozen weights stored in bf16 (tuner's default for ``mixed_precision = "bf16"``), latents and
prompt embeds cached with the VAE and text encoders moved off the device, SDPA attention, AdamW; with and
without gradient checkpointing. Training is tuner's own ``setup_run`` and ``tuner.train.loop.train`` (only
the final checkpoint and export are skipped): warm-up steps first (caching, kernel selection, optimizer
states), then the timed steps. Seconds per step are the median of the intervals between consecutive steps
(each ends with ``torch.cuda.synchronize()``); memory is ``torch.cuda.max_memory_allocated`` (and
``max_memory_reserved``) over the timed steps only, after ``reset_peak_memory_stats``.

Published anchors (SimpleTuner, H100): SD1.5 LoRA 2.87 GiB / 0.181 s per step; with gradient checkpointing
1.98 GiB / 0.305 s; SDXL LoRA with gradient checkpointing 6.53 GiB / 1.08 s. tuner's goal: below each.

    python bench/gpu.py                         # CUDA: 4 configurations, about 3-6 minutes in all
    python bench/gpu.py --only sd15             # one family
    python bench/gpu.py --device cpu --tiny     # the same script on small topologies, on the CPU (seconds)
    python bench/gpu.py --features --only sd15  # + the memory features' effect (SD1.5, checkpointing)
    python bench/gpu.py --breakdown             # + SD1.5 checkpointed: the peak by category, and a profile
    python bench/gpu.py --skip-base --features --breakdown   # the extra runs alone

``--features`` adds SD1.5 512 px runs with gradient checkpointing and one change each: channels_last, the frozen
weights stored in fp8 (``train.weight_dtype = "fp8"``, widened to bf16 layer by layer), and a
full fine-tune (DreamBooth without prior) with AdamW and with Adafactor + fused backward. ``--breakdown``
runs the SD1.5 checkpointed LoRA once more under ``tuner.plan.measure.TensorMemory`` (every live CUDA tensor
labelled: frozen weights, trainable weights, gradients, optimizer states, activations) beside
``tuner plan``'s components, then profiles three steps (GPU busy time against wall time, the top kernels).

The JSON rows go to ``bench/results/gpu_<card>_<date>.json`` (``--json PATH`` to choose; the tiny mode
writes only with ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rows import child_row, emit, set_keys

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
CONFIGS = (("sd15", 512, False), ("sd15", 512, True), ("sdxl", 1024, True), ("sdxl", 1024, False))
TINY_RESOLUTION = 64
ANCHORS = {("sd15", False): (2.87, 0.181), ("sd15", True): (1.98, 0.305), ("sdxl", True): (6.53, 1.08)}
"""(family, gradient checkpointing) -> (GiB, seconds per step): SimpleTuner on an H100."""
WARMUP = 2
TIMED = {"sd15": 20, "sdxl": 8}
CHILD_TIMEOUT_S = 170
FEATURES = (
    ("channels_last", ("train.channels_last=true",)),
    ("fp8 frozen weights", ('train.weight_dtype="fp8"',)),
    ("full fine-tune, AdamW", ('adapter.method="dreambooth"',)),
    ("full fine-tune, Adafactor + fused backward",
     ('adapter.method="dreambooth"', 'optim.optimizer="adafactor"', "optim.fused_backward=true")),
)
"""(label, recipe overrides) run on SD1.5 512 px with gradient checkpointing by ``--features``."""


def build_recipe(
    family: str, resolution: int, checkpointing: bool, device: str, out: Path, overrides: tuple[str, ...] = ()
):
    import tomllib

    from tuner.config.schema import Recipe

    r = Recipe()
    r.model.base = "tiny"  # replaced by the random base passed to setup_run
    r.data.path = str(ROOT / "datasets" / "sks_star")
    r.data.resolution = resolution
    r.output.dir, r.output.name = str(out), "bench"
    r.adapter.method, r.adapter.rank, r.adapter.alpha = "lora", 16, 16
    r.train.batch_size, r.train.mixed_precision, r.train.gradient_checkpointing = 1, "bf16", checkpointing
    r.train.device, r.train.checkpoint_every, r.preview.every = device, 0, 0
    r.optim.optimizer = "adamw"
    pairs = (item.partition("=") for item in overrides)  # "section.key=<TOML value>"
    set_keys(r, {key: tomllib.loads(f"v = {raw}")["v"] for key, _, raw in pairs})
    return r


class StepClock:
    """A tracker for ``tuner.train.loop``: the loop reports each finished step to it; the clock waits for
    the device and stamps the time (so intervals are whole steps, kernels included)."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def scalars(self, step, values) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.loss = float(values["loss"])

    def image(self, step, name, path) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_loop(clock: StepClock) -> Iterator[None]:
    """tuner's loop as is, except: the final checkpoint and export are skipped (I/O, not training steps)
    and its tracker is ``clock``."""
    import tuner.train.loop as loop

    saved = loop.save, loop.export_adapter, loop.open_tracker
    loop.save = lambda *_a, **_k: None
    loop.export_adapter = lambda *_a, **_k: []
    loop.open_tracker = lambda *_a, **_k: clock
    try:
        yield
    finally:
        loop.save, loop.export_adapter, loop.open_tracker = saved


def child(
    family: str,
    resolution: int,
    checkpointing: bool,
    device: str,
    tiny: bool,
    overrides: tuple[str, ...] = (),
    label: str = "",
    breakdown: bool = False,
) -> dict:
    """One configuration in this process: its row. ``breakdown``: also the peak by category and a profile."""
    import gc

    import torch

    import tuner.train.loop as loop
    from tuner.plan.measure import TensorMemory
    from tuner.train.setup import setup_run

    cuda = device.startswith("cuda")
    if tiny:
        from tuner.models.small import small_base

        base = small_base(family)
    else:
        from tuner.models.random_base import sd15_random_base, sdxl_random_base

        base = (sd15_random_base if family == "sd15" else sdxl_random_base)(device=device)
    clock = StepClock(device)
    timed, warmup = (2, 1) if tiny else (TIMED[family], WARMUP)
    extra: dict = {}
    with _quiet_loop(clock), tempfile.TemporaryDirectory() as tmp:
        recipe = build_recipe(family, resolution, checkpointing, device, Path(tmp), overrides)
        recipe.train.steps = warmup
        run = setup_run(recipe, base=base, log=lambda *_: None)
        loop.train(run, log=lambda *_: None)  # warm-up: caches, offload, optimizer states, kernel choice
        recipe.train.steps, run.start_step = warmup + timed + 1, warmup
        gc.collect()
        clock.stamps.clear()
        excluded = [run.base.vae if n == "vae" else run.base.text_encoders[n] for n in run.offloaded]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loop.train(run, log=lambda *_: None)
            peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            card = torch.cuda.get_device_name()
        else:  # no allocator statistics on the CPU: count live tensors the same way
            with TensorMemory("cpu", trainable=run.params, optimizer=run.optimizer, exclude=excluded) as mem:
                loop.train(run, log=lambda *_: None)
            peak, reserved, card = mem.peak, None, "cpu"
        stamps = list(clock.stamps)  # the timed steps only
        if breakdown:
            extra = _breakdown(run, recipe, excluded, device)
        plan = None
        if not tiny:
            from tuner.plan.estimate import plan_recipe

            plan = plan_recipe(recipe, family=family, device="cuda" if cuda else "cpu")
            extra["plan_components_gib"] = {c.name: c.bytes / GIB for c in plan.components}
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"family": family, "resolution": resolution, "gradient_checkpointing": checkpointing, "tiny": tiny,
            "label": label, "overrides": list(overrides),
            "card": card, "torch": torch.__version__, "timed_steps": len(steps),
            "seconds_per_step": statistics.median(steps), "seconds_min": min(steps), "seconds_max": max(steps),
            "peak_allocated_gib": peak / GIB, "peak_reserved_gib": None if reserved is None else reserved / GIB,
            "plan_tensors_gib": None if plan is None else plan.total_bytes / GIB,
            "plan_device_gib": None if plan is None else plan.device_bytes / GIB,
            "final_loss": clock.loss, "offloaded": list(run.offloaded), **extra}  # fmt: skip


def _breakdown(run, recipe, excluded: list, device: str) -> dict:
    """Two more steps under TensorMemory (the peak by category), then three under torch.profiler: GPU busy
    time against wall time and the ten kernels with the most GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import tuner.train.loop as loop

    cuda = device.startswith("cuda")
    start = recipe.train.steps
    recipe.train.steps, run.start_step = start + 2, start
    from tuner.plan.measure import TensorMemory

    with TensorMemory(device.split(":")[0], trainable=run.params, optimizer=run.optimizer, exclude=excluded) as mem:
        loop.train(run, log=lambda *_: None)
    out = {"breakdown_peak_gib": mem.peak / GIB,
           "breakdown_gib": {k: v / GIB for k, v in sorted(mem.at_peak.by_category.items())}}  # fmt: skip
    recipe.train.steps, run.start_step = start + 5, start + 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        loop.train(run, log=lambda *_: None)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:10]
    busy = sum(getattr(e, key, 0) for e in events) / 1e6
    out["profile"] = {"steps": 3, "wall_s": wall, "busy_s": busy, "ops": sum(e.count for e in events),
                      "top": [(e.key, getattr(e, key, 0) / 1e6, e.count) for e in top]}  # fmt: skip
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows beside the anchors; ratios only for full-size runs of the anchors' own
    configuration (tiny ones measure the script, not the model; feature rows change the job)."""
    lines = [
        "| model | px | grad ckpt | change | device | peak alloc GiB | reserved GiB | s/step (median) | "
        "anchor GiB | anchor s/step | memory ratio | time ratio | plan GiB (tensors) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = r.get("label") or ""
        anchor = None if change else ANCHORS.get((r["family"], r["gradient_checkpointing"]))
        mem_ratio = time_ratio = None
        if anchor and not r["tiny"]:
            mem_ratio, time_ratio = r["peak_allocated_gib"] / anchor[0], r["seconds_per_step"] / anchor[1]
        name = r["family"] + (" (tiny)" if r["tiny"] else "")
        lines.append(
            f"| {name} | {r['resolution']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {change or '-'} | "
            f"{r['card']} | {_fmt(r['peak_allocated_gib'], 3)} | {_fmt(r['peak_reserved_gib'], 3)} | "
            f"{_fmt(r['seconds_per_step'], 3)} | {_fmt(anchor and anchor[0])} | {_fmt(anchor and anchor[1], 3)} | "
            f"{_fmt(mem_ratio)} | {_fmt(time_ratio)} | {_fmt(r['plan_tensors_gib'])} |"
        )
    return "\n".join(lines)


def format_breakdown(row: dict) -> str:
    """The measured peak by category beside the planner's components, and the profile's summary."""
    plan = row.get("plan_components_gib") or {}
    measured = row["breakdown_gib"]
    lines = [f"peak by category ({row['family']} {row['resolution']} px, checkpointing "
             f"{'on' if row['gradient_checkpointing'] else 'off'}; TensorMemory {row['breakdown_peak_gib']:.3f} GiB)",
             "| category | measured GiB | tuner plan GiB |", "|---|---|---|"]  # fmt: skip
    for name in sorted(set(measured) | set(plan)):
        lines.append(f"| {name} | {_fmt(measured.get(name), 3)} | {_fmt(plan.get(name), 3)} |")
    prof = row["profile"]
    lines += ["", f"profile of {prof['steps']} steps: wall {prof['wall_s']:.3f} s, device busy {prof['busy_s']:.3f} s "
              f"({prof['busy_s'] / prof['wall_s']:.0%}), {prof['ops']} ops and kernels", "top by device time:"]  # fmt: skip
    lines += [f"  {t:8.4f} s  x{n:<5} {name[:90]}" for name, t, n in prof["top"]]
    return "\n".join(lines)


def _progress(r: dict, started: float) -> None:
    print(
        f"  {r['family']} {r['resolution']} px ckpt={'yes' if r['gradient_checkpointing'] else 'no '}"
        f"{' ' + r['label'] if r.get('label') else ''}: "
        f"{r['peak_allocated_gib']:.3f} GiB, {r['seconds_per_step']:.3f} s/step "
        f"({time.perf_counter() - started:.0f} s so far)",
        flush=True,
    )


def _jobs(args: argparse.Namespace) -> list[tuple[str, int, bool, tuple[str, ...], str, bool]]:
    """(family, resolution, checkpointing, overrides, label, breakdown) for each run asked for."""
    jobs = []
    if not args.skip_base:
        jobs += [(f, r, c, (), "", False) for f, r, c in CONFIGS if not args.only or f == args.only]
    if args.features and args.only != "sdxl":
        jobs += [("sd15", 512, True, over, label, False) for label, over in FEATURES]
    if args.breakdown:
        jobs.append(("sd15", 512, True, (), "breakdown", True))
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --tiny)")
    p.add_argument(
        "--tiny", action="store_true", help=f"small topologies at {TINY_RESOLUTION} px (a CPU check)"
    )
    p.add_argument("--only", choices=("sd15", "sdxl"), help="one family")
    p.add_argument("--features", action="store_true", help="also SD1.5 runs with one memory feature changed")
    p.add_argument("--breakdown", action="store_true", help="also SD1.5's peak by category and a profile")
    p.add_argument("--skip-base", action="store_true", help="only the --features/--breakdown runs")
    p.add_argument("--json", type=Path, help="where to write the rows")
    p.add_argument("--child", nargs=3, metavar=("FAMILY", "RESOLUTION", "CKPT"), help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # tuner's progress bars would bury the table
    if args.child:
        family, res, ckpt = args.child
        emit(child(family, int(res), ckpt == "1", args.device, args.tiny, tuple(args.set), args.label,
                   args.breakdown))  # fmt: skip
        return 0
    if not args.tiny:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error("no CUDA device here; use --device cpu --tiny for the CPU check")
        if args.device == "cpu":
            p.error("full-size runs need an accelerator (the CPU would take hours); add --tiny")
    print(__doc__.split("\n\n")[1].replace("\n", " "), flush=True)  # the status paragraph
    rows = []
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    jobs = _jobs(args)
    for family, resolution, ckpt, overrides, label, breakdown in jobs:
        res = TINY_RESOLUTION if args.tiny else resolution
        if args.tiny:  # small models: one process for all (imports dominate); peaks are counted per run
            rows.append(child(family, res, ckpt, args.device, True, overrides, label, breakdown))
            _progress(rows[-1], started)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", family, str(res), str(int(ckpt)),
               "--device", args.device, "--label", label, *(f"--set={o}" for o in overrides)]  # fmt: skip
        if breakdown:
            cmd.append("--breakdown")
        row = child_row(cmd, label=f"{family} {res} px ckpt={ckpt} {label}", env=env, cwd=ROOT,
                        timeout=CHILD_TIMEOUT_S * (2 if breakdown else 1))  # fmt: skip
        if row is None:
            continue
        rows.append(row)
        _progress(rows[-1], started)
    print()
    print(format_table(rows))
    for row in rows:
        if "breakdown_gib" in row:
            print()
            print(format_breakdown(row))
    path = args.json
    if path is None and not args.tiny and rows:
        card = re.sub(r"[^a-z0-9]+", "-", rows[0]["card"].lower()).strip("-")
        path = ROOT / "bench" / "results" / f"gpu_{card}_{time.strftime('%Y-%m-%d')}.json"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        print(f"\nrows written to {path}")
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
