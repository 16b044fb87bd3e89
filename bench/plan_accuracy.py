"""`tuner plan` against measured peaks, component by component, on the CPU.

Each configuration runs in its own child process: tuner's own setup and training loop
(``tuner.train.loop.train``) take one warm-up step (optimizer states created, caches filled, the VAE and
text encoder moved off the training device), then two more steps under
:class:`tuner.plan.measure.TensorMemory`, which counts every live tensor storage the way
``torch.cuda.max_memory_allocated`` does on a GPU. Its peak, split into frozen weights, trainable weights,
gradients, optimizer states and activations (+ workspace), is set beside ``tuner plan``'s prediction for the
same recipe on a CPU device.

The child's resident set (``VmHWM`` over the same two steps) is reported too, with what separates it from
the tensors: the process before any model existed (Python, torch, diffusers, transformers), the components
moved "off the device" (on the CPU that is the same memory), and the rest (glibc keeps freed blocks,
thread-local arenas). Comparing the plan with process RSS is what made the earlier figures look 8-36% low.

    python bench/plan_accuracy.py --bases tiny                 # about a minute
    python bench/plan_accuracy.py --bases sd15-random --configs lora:plain dreambooth:8bit+gc
    python bench/plan_accuracy.py --json bench/results/plan_accuracy_cpu.json

The full-size SD1.5 architecture (random weights, 256 px, fp32 on the CPU) needs 6-16 GB per configuration
and minutes; run few at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rows import child_row, emit, method_recipe

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dreambooth_lora", "dreambooth", "textual_inversion", "pivotal")
SETTINGS = {"plain": ("adamw", False), "8bit+gc": ("adamw8bit", True), "adafactor": ("adafactor", False)}
BASES = {"tiny": (128, 2), "sd15-random": (256, 1)}  # resolution, batch
COMPONENTS = ("frozen weights", "trainable weights", "gradients", "optimizer states", "activations+workspace")
MB = 2**20


def build_recipe(base: str, method: str, setting: str, out: Path):
    optimizer, checkpointing = SETTINGS[setting]
    r = method_recipe(method, out, optimizer=optimizer, checkpointing=checkpointing)
    r.data.resolution, r.train.batch_size = BASES[base]
    r.train.steps = 1
    return r


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def child(base: str, method: str, setting: str) -> dict:
    """One configuration in this process: its row (bytes)."""
    import diffusers  # noqa: F401  (the libraries' footprint is the process baseline)
    import transformers  # noqa: F401

    import tuner.train.loop as loop
    from tuner.plan.estimate import plan_recipe
    from tuner.plan.measure import TensorMemory
    from tuner.train.setup import setup_run

    baseline = _status("VmRSS:")
    loop.save = lambda *_a, **_k: None  # the final checkpoint and export are I/O, not training
    loop.export_adapter = lambda *_a, **_k: []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = build_recipe(base, method, setting, Path(tmp))
        plan = plan_recipe(recipe, family="sd15" if base == "sd15-random" else None, device="cpu")
        model = None
        if base == "sd15-random":
            from tuner.models.random_base import sd15_random_base

            model = sd15_random_base()
        run = setup_run(recipe, base=model, log=lambda *_: None)
        loop.train(run, log=lambda *_: None)  # warm-up: caches, offload, optimizer states
        recipe.train.steps, run.start_step = 3, 1
        offloaded = [
            run.base.vae if name == "vae" else run.base.text_encoders[name] for name in run.offloaded
        ]
        offloaded_bytes = sum(p.nbytes for m in offloaded for p in m.parameters())
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM: the RSS peak of the measured steps only
        except OSError:
            pass
        started = time.perf_counter()
        with TensorMemory("cpu", trainable=run.params, optimizer=run.optimizer, exclude=offloaded) as mem:
            loop.train(run, log=lambda *_: None)
        seconds = time.perf_counter() - started
        rss_peak = _status("VmHWM:")
    measured = dict(mem.at_peak.by_category)
    measured["activations+workspace"] = measured.pop("activations", 0) + measured.pop("optimizer step", 0)
    predicted = {c.name: c.bytes for c in plan.components}
    predicted["activations+workspace"] = predicted.pop("activations", 0) + predicted.pop("workspace", 0)
    return {"base": base, "method": method, "setting": setting, "resolution": recipe.data.resolution,
            "batch": recipe.train.batch_size, "measured_peak": mem.peak, "predicted_peak": plan.total_bytes,
            "measured": measured, "predicted": predicted, "rss_step_peak": rss_peak, "rss_baseline": baseline,
            "offloaded": offloaded_bytes, "seconds_2_steps": round(seconds, 1)}  # fmt: skip


def format_rows(rows: list[dict]) -> str:
    lines = ["| base | method | setting | measured peak (MB) | plan (MB) | plan / measured | "
             + " | ".join(f"{c} plan/meas (MB)" for c in COMPONENTS) + " |",
             "|---" * (6 + len(COMPONENTS)) + "|"]  # fmt: skip
    for r in rows:
        cells = []
        for c in COMPONENTS:
            p, m = r["predicted"].get(c, 0) / MB, r["measured"].get(c, 0) / MB
            cells.append(f"{p:,.1f} / {m:,.1f}")
        lines.append(
            f"| {r['base']} | {r['method']} | {r['setting']} | {r['measured_peak'] / MB:,.1f} | "
            f"{r['predicted_peak'] / MB:,.1f} | {r['predicted_peak'] / r['measured_peak']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Process memory (RSS) over the same steps: what separates it from the tensors.",
        "| base | method | setting | RSS peak (MB) | libraries, before any model (MB) | tensors on the device "
        "(MB) | components moved off the device, still in RAM (MB) | rest (MB) |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        rest = r["rss_step_peak"] - r["rss_baseline"] - r["measured_peak"] - r["offloaded"]
        lines.append(
            f"| {r['base']} | {r['method']} | {r['setting']} | {r['rss_step_peak'] / MB:,.0f} | "
            f"{r['rss_baseline'] / MB:,.0f} | {r['measured_peak'] / MB:,.0f} | {r['offloaded'] / MB:,.0f} | "
            f"{rest / MB:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", nargs="+", choices=tuple(BASES), default=["tiny"])
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="METHOD:SETTING",
        help=f"default: every method x plain, 8bit+gc ({', '.join(METHODS)}; {', '.join(SETTINGS)})",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", nargs=3, metavar=("BASE", "METHOD", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emit(child(*args.child))
        return 0
    configs = (
        [tuple(c.split(":")) for c in args.configs]
        if args.configs
        else [(m, s) for m in METHODS for s in ("plain", "8bit+gc")]
    )
    for method, setting in configs:
        if method not in METHODS or setting not in SETTINGS:
            p.error(f"unknown configuration {method}:{setting}")
    rows = []
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    for base in args.bases:
        for method, setting in configs:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", base, method, setting]
            r = child_row(cmd, label=f"{base} {method} {setting}", env=env, cwd=ROOT)
            if r is None:
                continue
            rows.append(r)
            print(
                f"  {base:12s} {method:18s} {setting:9s} measured {r['measured_peak'] / MB:>9,.1f} MB  "
                f"plan {r['predicted_peak'] / MB:>9,.1f} MB  ratio {r['predicted_peak'] / r['measured_peak']:.2f}",
                flush=True,
            )
    print()
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
