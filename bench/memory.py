"""Peak process memory of every training method, with and without 8-bit AdamW + gradient checkpointing.

Each configuration trains a few steps in its own child process (so one peak never hides another) on
(a) the embedded tiny base at 64 px and (b) the full-size SD1.5 architecture with random weights at
256 px, batch 1. The figure is the child's peak resident set size (``ru_maxrss``) when the last training
step has finished: model loading, caching, class-image generation for prior preservation and the steps
themselves are in it; the final checkpoint and export are skipped (they are I/O, not training).

    python bench/memory.py                     # both bases, every method, both memory settings
    python bench/memory.py --bases tiny        # the fast part only (about a minute)
    python bench/memory.py --json out.json     # also write the rows

CPU figures: on a GPU the same settings move the weights, gradients and optimizer states to device memory
(``tuner plan`` predicts those); the ratios between settings carry over, the absolute numbers do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rows import child_row, emit, high_water_mb, method_recipe, peak_at_the_end

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dreambooth_lora", "dreambooth", "textual_inversion", "pivotal")
SETTINGS = {"plain": ("adamw", False), "8bit+gc": ("adamw8bit", True)}
BASES = {"tiny": 64, "sd15-random": 256}


def build_recipe(base: str, method: str, setting: str, out: Path, steps: int):
    optimizer, checkpointing = SETTINGS[setting]
    r = method_recipe(method, out, optimizer=optimizer, checkpointing=checkpointing)
    r.data.resolution = BASES[base]
    r.train.steps, r.train.batch_size = steps, 1
    return r


def child(base: str, method: str, setting: str, steps: int) -> dict:
    """Run one configuration in this process; returns its row."""
    import diffusers  # noqa: F401  (the libraries' own footprint is the baseline, not the run's)
    import transformers  # noqa: F401

    import tuner.train.loop as loop
    from tuner.plan.estimate import plan_recipe
    from tuner.train.setup import setup_run

    baseline_mb = high_water_mb()
    peak: dict[str, float] = {}
    peak_at_the_end(loop, peak, "rss_mb")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = build_recipe(base, method, setting, Path(tmp), steps)
        predicted = plan_recipe(recipe, family="sd15" if base == "sd15-random" else None)
        model = None
        if base == "sd15-random":
            from tuner.models.random_base import sd15_random_base

            model = sd15_random_base()
        started = time.perf_counter()
        run = setup_run(recipe, base=model, log=lambda *_: None)
        trainable = sum(p.numel() for group in run.optimizer.param_groups for p in group["params"])
        result = loop.train(run, log=lambda *_: None)
    return {"base": base, "method": method, "setting": setting, "steps": steps,
            "peak_rss_mb": round(peak["rss_mb"]), "baseline_mb": round(baseline_mb),
            "run_mb": round(peak["rss_mb"] - baseline_mb), "plan_mb": round(predicted.total_bytes / 2**20),
            "trainable": trainable,
            "seconds": round(time.perf_counter() - started, 1), "final_loss": round(result.final_loss, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", nargs="+", choices=tuple(BASES), default=list(BASES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", nargs=3, metavar=("BASE", "METHOD", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emit(child(*args.child, args.steps))
        return 0

    rows = []
    env = dict(os.environ, TQDM_DISABLE="1")
    for base in args.bases:
        for method in args.methods:
            for setting in SETTINGS:
                cmd = [sys.executable, __file__, "--child", base, method, setting, "--steps", str(args.steps)]
                r = child_row(cmd, label=f"{base} {method} {setting}", env=env, cwd=ROOT)
                if r is None:
                    continue
                rows.append(r)
                print(f"  {base:12s} {method:18s} {setting:8s} {r['peak_rss_mb']:>7} MB  {r['seconds']:>6} s",
                      flush=True)
    print()
    print("| base | method | trainable params | peak, AdamW (MB) | peak, AdamW8bit + grad ckpt (MB) | ratio |")
    print("|---|---|---|---|---|---|")
    table_rows = []
    for base in args.bases:
        for method in args.methods:
            cells = {r["setting"]: r for r in rows if r["base"] == base and r["method"] == method}
            if len(cells) != 2:
                continue
            a, b = cells["plain"]["peak_rss_mb"], cells["8bit+gc"]["peak_rss_mb"]
            print(f"| {base} | {method} | {cells['plain']['trainable']:,} | {a} | {b} | {b / a:.2f} |")
            table_rows.extend(cells.values())
    print()
    print("`tuner plan` beside the process's own memory (peak RSS minus the footprint after the imports). RSS is")
    print("not what plan predicts: it also holds modules moved off the device (the same RAM on a CPU) and memory")
    print("the allocator keeps after frees. For plan's accuracy compare live tensors: bench/plan_accuracy.py.")
    print("| base | method | setting | run (MB) | plan, tensors (MB) | plan / run |")
    print("|---|---|---|---|---|---|")
    for r in table_rows:
        print(f"| {r['base']} | {r['method']} | {r['setting']} | {r['run_mb']} | {r['plan_mb']} | "
              f"{r['plan_mb'] / max(1, r['run_mb']):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
