"""Memory per process of data-parallel training with tuner's sharding switches, side by side: a full fine-tune
unsharded, with ZeRO-1 (``optim.shard_states``) and ZeRO-2 (``optim.shard_gradients``); a LoRA unsharded and
with its frozen UNet split (``train.shard_frozen``, FSDP-style).

Each setting is one launch of 2 CPU processes (gloo, one thread each) under ``torch.distributed.run``, training
a few steps with AdamW8bit and gradient checkpointing. The figures: each process's peak resident set size
(``ru_maxrss``) over its whole life and over training alone (the high-water mark is reset through
``/proc/self/clear_refs`` once the run is set up: loading the whole base comes before any split), the final
checkpoint and export skipped; the most gradient elements process 0 held at once (ZeRO-2 measures it on its
``.grad`` tensors; otherwise it is all of them); the optimizer state bytes process 0 keeps; ``tuner plan``'s
per-process prediction of tensor memory; and the loss (the same weights in every setting of a method, so
the same loss up to float rounding).

    python bench/zero.py                        # the full-size SD1.5 UNet at 64 px (about 20 GB of RAM in all)
    python bench/zero.py --base tiny            # the embedded base (a minute; too small to show much)
    python bench/zero.py --json out.json

CPU figures. On GPUs the same tensors live in device memory: the per-process savings carry over (they are
tensor bytes), the absolute RSS does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rows import child_row, emit, high_water_mb, peak_at_the_end, reset_high_water, set_keys

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # method -> setting -> recipe keys
    "dreambooth": {"unsharded": {}, "ZeRO-1": {"optim.shard_states": True}, "ZeRO-2": {"optim.shard_gradients": True}},
    "lora": {"unsharded": {}, "shard_frozen": {"train.shard_frozen": True}},
}
BASES = {"tiny": 64, "sd15-random": 64}
PROCESSES = 2


def build_recipe(base: str, method: str, setting: str, out: Path, steps: int):
    from tuner.config.schema import Recipe

    r = Recipe()
    r.model.base = "tiny"
    r.data.path = str(ROOT / "datasets" / "sks_star")
    r.data.resolution = BASES[base]
    r.output.dir, r.output.name = str(out), "bench"
    r.train.steps, r.train.batch_size, r.train.seed = steps, 1, 0
    r.train.checkpoint_every, r.preview.every = 0, 0
    r.train.gradient_checkpointing = True
    r.adapter.method = method
    r.optim.optimizer = "adamw8bit"
    set_keys(r, SETTINGS[method][setting])
    return r


def worker(base: str, method: str, setting: str, steps: int) -> None:
    """One of the launch's processes: train, then rank 0 prints every process's figures as one row."""
    import torch
    import torch.distributed as dist

    import tuner.train.loop as loop
    from tuner.plan.estimate import plan_recipe
    from tuner.train.setup import setup_run

    peak: dict[str, float] = {}
    peak_at_the_end(loop, peak, "train_mb")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = build_recipe(base, method, setting, Path(tmp), steps)
        model = None
        if base == "sd15-random":
            from tuner.models.random_base import sd15_random_base

            model = sd15_random_base()
        run = setup_run(recipe, base=model, log=lambda *_: None)
        del model
        whole_so_far = high_water_mb()
        reset = reset_high_water()
        set_up = high_water_mb()  # = the resident size now, once reset
        result = loop.train(run, log=lambda *_: None)
        inner = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper
        local = getattr(inner, "optim", inner)  # ZeroRedundancyOptimizer's own share
        states = sum(t.numel() * t.element_size() for st in local.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor))
        shards = run.grad_shards
        total = sum(p.numel() for p in run.params)
        mine = {"rss_mb": round(max(whole_so_far, peak["train_mb"])),
                "train_mb": round(peak["train_mb"]) if reset else None,
                "setup_mb": round(set_up) if reset else None, "states_mb": round(states / 2**20, 1),
                "grad_peak": shards.peak if shards else total, "grad_total": total}
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
        if dist.get_rank() == 0:
            plan = plan_recipe(recipe, family="sd15" if base == "sd15-random" else None, processes=PROCESSES)
            emit({"base": base, "method": method, "setting": setting, "steps": steps, "processes": rows,
                  "plan_mb": round(plan.total_bytes / 2**20), "final_loss": round(result.final_loss, 6)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", choices=tuple(BASES), default="sd15-random")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--methods", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    p.add_argument("--worker", nargs=3, metavar=("BASE", "METHOD", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.steps)
        return 0
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    rows = []
    for method in args.methods:
        for setting in SETTINGS[method]:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
                   __file__, "--worker", args.base, method, setting, "--steps", str(args.steps)]
            r = child_row(cmd, label=f"{args.base} {method} {setting}", env=env, cwd=Path(tempfile.gettempdir()))
            if r is not None:
                rows.append(r)
                print(f"  {method:10s} {setting:12s} {max(q['rss_mb'] for q in r['processes']):>7} MB per process",
                      flush=True)
    print()
    print(f"{args.base} at {BASES[args.base]} px, batch 1 per process, AdamW8bit, gradient checkpointing, "
          f"{PROCESSES} processes, {args.steps} steps (CPU, gloo)")
    print("| method | setting | peak RSS per process, whole run (MB) | peak RSS per process, training (MB) | "
          "RSS once set up (MB) | gradient elements held by process 0 | optimizer states, process 0 (MB) | "
          "plan, tensors per process (MB) | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["processes"][0]
        print(f"| {r['method']} | {r['setting']} | {' / '.join(str(x['rss_mb']) for x in r['processes'])} | "
              f"{' / '.join(str(x['train_mb']) for x in r['processes'])} | "
              f"{' / '.join(str(x['setup_mb']) for x in r['processes'])} | "
              f"{q['grad_peak']:,} of {q['grad_total']:,} ({q['grad_peak'] / q['grad_total']:.0%}) | "
              f"{q['states_mb']:,} | {r['plan_mb']:,} | {r['final_loss']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
