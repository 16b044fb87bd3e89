"""Train the same LoRA job with tuner and with diffusers' own example trainer, side by side (issue 8).

The rival is diffusers' ``examples/dreambooth/train_dreambooth_lora.py``, which is not part of this project:

    git clone https://github.com/huggingface/diffusers ../diffusers      # or, for one file only:
    curl -LO https://raw.githubusercontent.com/huggingface/diffusers/main/examples/dreambooth/train_dreambooth_lora.py

    python bench/train_vs_diffusers.py --rival ../diffusers/examples/dreambooth/train_dreambooth_lora.py
    python bench/train_vs_diffusers.py --rival R --bases tiny --json out.json      # the fast part only

The job, identical for both trainers: the same base read from the same diffusers folder ((a) the embedded
tiny base exported with ``export_base``, 64 px; (b) the full-size SD1.5 architecture with random weights,
256 px, exported once to ``--sd15-dir``), the images of ``datasets/sks_star`` copied without their captions
so both train on one fixed prompt (the rival's ``--instance_prompt``, tuner's ``data.instance_prompt``),
LoRA on the UNet's attention ``to_q/to_k/to_v/to_out.0`` (tuner's ``attention`` preset) with alpha = rank,
AdamW (lr, betas, eps, weight decay 1e-2, clip 1.0), constant schedule, fp32, no gradient checkpointing,
centre crop, no flip, same batch, steps and seed. Each trainer runs with its own defaults otherwise: tuner
caches latents and prompt embeddings (the VAE and text encoder leave the device); the rival encodes every
batch with the VAE and the text encoder (``--rival-args=--pre_compute_text_embeddings`` gives it its own
prompt cache). The trainable parameter counts are printed so a target mismatch would show.

Each trainer runs in its own child process. Figures per child:
  * samples/s: steady state, batch x (steps - 1) / time between the end of the first and of the last
    backward pass (each step's data, noise, forward, backward and optimizer step; no loading or saving);
  * peak memory: the child's ``ru_maxrss`` when the last backward pass ends (the training peak, loading
    and caching included); the steady peak, from the end of the first backward pass to the end of the last
    (the high-water mark is reset there through ``/proc/self/clear_refs``: training alone: loading and
    caching are behind; the optimizer states, made in the first update, fall inside); and the whole process's peak (the rival also
    reloads the pipeline at the end). This process never imports torch: on Linux a child's ``ru_maxrss``
    starts from its parent's resident size at the fork;
  * final loss: the mean of the last ``min(10, steps)`` losses (one step's loss is a single random timestep).
The sampler part times tuner's sampler (same seeds, steps, CFG) on the bare base and with tuner's trained
LoRA merged into the weights, in one child, after one warm-up image.

torchvision: the rival imports ``torchvision.transforms`` (Resize, CenterCrop, ToTensor, Normalize). When
torchvision cannot be imported (PyPI has no CPU build matching every CPU torch), a small shim with those
few transforms (PIL + torch, same maths) is registered as ``torchvision`` inside the rival's child process
only, after transformers, peft and diffusers have been imported (on PYTHONPATH, transformers would take it
for the whole package); the line printed before the table says which was used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rows import high_water_mb, reset_high_water, set_keys

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large sks star on a black background"
BASES = {"tiny": 64, "sd15-random": 256}

TORCHVISION_SHIM = '''"""Minimal torchvision.transforms for diffusers' DreamBooth example (bench/train_vs_diffusers.py)."""
import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:  # short side to size, aspect kept (torchvision's rule for an int size)
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.mode = size, _PIL[interpolation.value]

    def __call__(self, img):
        w, h = img.size
        if min(w, h) == self.size:
            return img
        if w <= h:
            nw, nh = self.size, int(self.size * h / w)
        else:
            nw, nh = int(self.size * w / h), self.size
        return img.resize((nw, nh), self.mode)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, img):
        w, h = img.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return img.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class ToTensor:
    def __call__(self, img):
        a = np.asarray(img, dtype=np.float32) / 255.0
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.transpose(2, 0, 1).copy())


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std
'''


# --- in the child: what every trainer reports ---------------------------------------------------------------


def _instrument() -> dict:
    """Record time, loss and peak RSS at the end of every backward pass, and the optimizer's parameter count.

    Both trainers end up in ``torch.Tensor.backward`` (tuner and the rival call ``accelerator.backward``) and
    build a ``torch.optim.AdamW``; patching those two is the same measurement for both.
    """
    import torch

    rec: dict = {"t": [], "loss": [], "rss_mb": 0.0, "before_mb": 0.0, "steady_mb": None, "trainable": 0}
    backward = torch.Tensor.backward

    def timed_backward(self, *args, **kwargs):
        out = backward(self, *args, **kwargs)
        rec["t"].append(time.perf_counter())
        rec["loss"].append(float(self.detach()))
        now = high_water_mb()
        if len(rec["t"]) == 1:  # loading, caching and the first step: then the steady-state peak starts
            rec["before_mb"] = now
            if reset_high_water():
                rec["steady_mb"] = high_water_mb()
        elif rec["steady_mb"] is not None:
            rec["steady_mb"] = now
        rec["rss_mb"] = max(rec["before_mb"], now)
        return out

    adamw_init = torch.optim.AdamW.__init__

    def counting_init(self, params, *args, **kwargs):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        rec["trainable"] += sum(p.numel() for g in groups for p in g["params"])
        adamw_init(self, params, *args, **kwargs)

    torch.Tensor.backward = timed_backward
    torch.optim.AdamW.__init__ = counting_init
    return rec


def _summary(rec: dict, batch: int, started: float) -> dict:
    t, losses = rec["t"], rec["loss"]
    tail = losses[-min(10, len(losses)) :]
    return {
        "steps_done": len(t),
        "samples_per_s": round(batch * (len(t) - 1) / (t[-1] - t[0]), 4) if len(t) > 1 else None,
        "s_per_step": round((t[-1] - t[0]) / (len(t) - 1), 4) if len(t) > 1 else None,
        "samples_per_s_median_step": round(batch / statistics.median(b - a for a, b in zip(t, t[1:])), 4)
        if len(t) > 1
        else None,
        "seconds_to_first_step": round(t[0] - started, 1) if t else None,
        "train_peak_rss_mb": round(rec["rss_mb"]),
        "steady_peak_rss_mb": None if rec["steady_mb"] is None else round(rec["steady_mb"]),
        "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
        "last_loss": round(losses[-1], 5) if losses else None,
        "trainable": rec["trainable"],
        "step_s": [round(b - a, 3) for a, b in zip(t, t[1:])],
    }


def child_tuner(job: dict) -> dict:
    started = time.perf_counter()
    rec = _instrument()
    import tuner.train.loop as loop
    from tuner.config.schema import Recipe
    from tuner.train.setup import setup_run

    r = Recipe()
    r.model.base = job["base_dir"]
    r.data.path, r.data.instance_prompt, r.data.resolution = job["data"], PROMPT, job["resolution"]
    r.data.center_crop, r.data.flip = True, False
    r.adapter.method, r.adapter.targets = "lora", "attention"
    r.adapter.rank, r.adapter.alpha = job["rank"], float(job["rank"])
    r.train.steps, r.train.batch_size, r.train.seed = job["steps"], job["batch"], job["seed"]
    r.train.mixed_precision, r.train.gradient_checkpointing, r.train.checkpoint_every = "no", False, 0
    r.train.device = "cpu"
    r.optim.optimizer, r.optim.learning_rate, r.optim.schedule = "adamw", job["lr"], "constant"
    r.preview.every = 0
    r.output.dir, r.output.name = job["out"], "bench"
    set_keys(r, job.get("set", {}))  # a --tuner-set variant: one recipe key changed
    run = setup_run(r, log=lambda *_: None)
    result = loop.train(run, log=lambda *_: None)
    row = _summary(rec, job["batch"], started)
    row["lora"] = str(next(p for p in result.outputs if str(p).endswith("bench.safetensors")))
    return row


def _install_torchvision_shim() -> None:
    """Register the shim as ``torchvision`` in this process only, after transformers, peft and diffusers have
    decided torchvision is absent (put on PYTHONPATH, transformers would take it for the real package)."""
    import types

    import diffusers.training_utils  # noqa: F401
    import peft  # noqa: F401
    import transformers.image_utils  # noqa: F401

    transforms = types.ModuleType("torchvision.transforms")
    exec(compile(TORCHVISION_SHIM, "<torchvision shim>", "exec"), transforms.__dict__)
    package = types.ModuleType("torchvision")
    package.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = package, transforms


def child_rival(job: dict) -> dict:
    import runpy

    started = time.perf_counter()
    rec = _instrument()
    sys.argv = [
        job["rival"],
        "--pretrained_model_name_or_path", job["base_dir"],
        "--instance_data_dir", job["data"],
        "--instance_prompt", PROMPT,
        "--output_dir", job["out"],
        "--resolution", str(job["resolution"]), "--center_crop",
        "--train_batch_size", str(job["batch"]),
        "--max_train_steps", str(job["steps"]),
        "--checkpointing_steps", str(job["steps"] + 1),
        "--learning_rate", str(job["lr"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--rank", str(job["rank"]), "--seed", str(job["seed"]),
        "--mixed_precision", "no",  # --report_to: its default (tensorboard) is skipped if absent
        *job["rival_args"],
    ]  # fmt: skip
    try:
        import torchvision  # noqa: F401
    except Exception:
        _install_torchvision_shim()
    runpy.run_path(job["rival"], run_name="__main__")
    return _summary(rec, job["batch"], started)


def child_sample(job: dict) -> dict:
    import torch

    from tuner.models.base import load_base
    from tuner.sample.generate import LoraSpec, apply_loras, load_loras_for
    from tuner.sample.sampler import SampleSettings, sample_images

    base = load_base(job["base_dir"])
    settings = SampleSettings(
        steps=job["sample_steps"], cfg=5.0, sampler="ddim", width=job["resolution"], height=job["resolution"]
    )
    n = job["sample_images"]
    prompts, seeds = [PROMPT] * n, list(range(n))

    def per_image() -> float:
        t0 = time.perf_counter()
        sample_images(base, prompts, seeds, settings)
        return (time.perf_counter() - t0) / n

    torch.manual_seed(0)
    sample_images(base, [PROMPT], [99], settings)  # warm-up
    bare = per_image()
    apply_loras(base, load_loras_for(base, [LoraSpec(Path(job["lora"]))]), merge=True)
    merged = per_image()
    return {
        "bare_s_per_image": round(bare, 4),
        "merged_s_per_image": round(merged, 4),
        "sample_steps": job["sample_steps"],
        "images": n,
    }


# --- in the parent --------------------------------------------------------------------------------------------


def run_child(kind: str, job: dict, env: dict) -> tuple[dict | None, float, str]:
    """Run one child; returns (its row, its whole-process peak RSS in MB, stderr tail)."""
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(job)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("ROW ")), None)
    if proc.returncode != 0 or line is None:
        return None, 0.0, f"exit {proc.returncode}\n{stderr[-3000:]}"
    row = json.loads(line[4:])
    return row, max(usage.ru_maxrss / 1024, row.pop("child_peak_mb")), ""


def prepare_sd15(folder: Path) -> None:
    """Export the full-size SD1.5 architecture with random weights (seed 0) and the real CLIP tokenizer."""
    from dataclasses import replace

    from tuner.models.base import export_base
    from tuner.models.families import SD15
    from tuner.models.random_base import sd15_random_base
    from tuner.models.single_file import build_tokenizer

    export_base(replace(sd15_random_base(), tokenizer=build_tokenizer(SD15)), folder)


def child_prepare(job: dict) -> dict:
    """Export the bases the run needs; say whether torchvision imports (the rival needs its transforms)."""
    out: dict = {}
    try:
        import torchvision  # noqa: F401

        out["torchvision"] = "torchvision: installed"
    except Exception:
        out["torchvision"] = (
            "torchvision: not importable here; the rival ran with this script's transforms shim"
        )
    if "tiny" in job["bases"]:
        from tuner.models.base import export_base, load_base

        out["tiny"] = str(export_base(load_base("tiny"), job["tiny_dir"]))
    if "sd15-random" in job["bases"]:
        folder = Path(job["sd15_dir"])
        if not (folder / "model_index.json").is_file():
            prepare_sd15(folder)
        out["sd15-random"] = str(folder)
    return out


def _value(text: str):
    """A --tuner-set value: JSON (numbers, true/false) or else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _who(row: dict) -> str:
    if row["trainer"] == "rival":
        return "diffusers example"
    return f"tuner ({row['variant']})" if row.get("variant") else "tuner"


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rival",
        type=Path,
        default=ROOT.parent / "diffusers/examples/dreambooth/train_dreambooth_lora.py",
        help="path to diffusers' examples/dreambooth/train_dreambooth_lora.py",
    )
    p.add_argument(
        "--rival-args",
        default="",
        help="extra arguments for the rival, one string (e.g. '--pre_compute_text_embeddings')",
    )
    p.add_argument("--bases", nargs="+", choices=tuple(BASES), default=list(BASES))
    p.add_argument("--steps", type=int, nargs=2, default=[100, 5], metavar=("TINY", "SD15"))
    p.add_argument("--batch", type=int, nargs=2, default=[2, 1], metavar=("TINY", "SD15"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-images", type=int, nargs=2, default=[8, 1], metavar=("TINY", "SD15"))
    p.add_argument("--sample-steps", type=int, nargs=2, default=[20, 5], metavar=("TINY", "SD15"))
    p.add_argument(
        "--sd15-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "tuner-sd15-random-diffusers",
        help="the random SD1.5 diffusers folder (written once if missing)",
    )
    p.add_argument(
        "--tuner-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra tuner row with one recipe key changed, e.g. train.weight_dtype=fp8 (repeatable)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, job = args.child[0], json.loads(args.child[1])
        children = {
            "tuner": child_tuner,
            "rival": child_rival,
            "sample": child_sample,
            "prepare": child_prepare,
        }
        row = children[kind](job)
        # the whole child's peak: wait4's figure misses what came before a reset of the high-water mark, which
        # the training peak (the high-water mark at the first backward pass or later) includes
        row["child_peak_mb"] = round(max(row.get("train_peak_rss_mb", 0), high_water_mb()))
        print("ROW " + json.dumps(row), flush=True)
        return 0

    if not args.rival.is_file():
        print(
            f"rival trainer not found at '{args.rival}'. Get diffusers' example trainer beside the project:\n"
            "  git clone https://github.com/huggingface/diffusers ../diffusers\n"
            "or just the file (pick the tag of your installed diffusers, e.g. v0.36.0, or main):\n"
            "  curl -LO https://raw.githubusercontent.com/huggingface/diffusers/main/"
            "examples/dreambooth/train_dreambooth_lora.py\n"
            "and pass --rival PATH.",
            file=sys.stderr,
        )
        return 2

    work = Path(tempfile.mkdtemp(prefix="tuner-vs-diffusers-"))
    data = work / "data"
    data.mkdir()
    for img in sorted((ROOT / "datasets" / "sks_star").glob("*.png")):  # images only: one fixed prompt
        shutil.copy(img, data / img.name)

    env = dict(
        os.environ,
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    if "sd15-random" in args.bases and not (args.sd15_dir / "model_index.json").is_file():
        print(f"writing the random SD1.5 base to {args.sd15_dir} (once)...", flush=True)
    # In a child too: this process never imports torch, because a child's ru_maxrss on Linux starts from
    # its parent's resident size at the fork (the exec keeps the old high-water mark).
    prepared, _, err = run_child(
        "prepare",
        {"bases": args.bases, "tiny_dir": str(work / "tiny-diffusers"), "sd15_dir": str(args.sd15_dir)},
        env,
    )
    if prepared is None:
        print(f"preparing the bases FAILED ({err})", file=sys.stderr)
        return 1
    tv_note = prepared["torchvision"]
    base_dirs = {name: Path(prepared[name]) for name in args.bases}

    rows: list[dict] = []
    for i, (name, resolution) in enumerate(BASES.items()):
        if name not in args.bases:
            continue
        job = {
            "base_dir": str(base_dirs[name]),
            "data": str(data),
            "resolution": resolution,
            "steps": args.steps[i],
            "batch": args.batch[i],
            "rank": args.rank,
            "lr": args.lr,
            "seed": args.seed,
            "rival": str(args.rival.resolve()),
            "rival_args": args.rival_args.split(),
        }
        found: dict[str, dict] = {}
        for k, (trainer, variant) in enumerate(
            [("tuner", ""), ("rival", ""), *(("tuner", v) for v in args.tuner_set)]
        ):
            out = work / f"{name}-{trainer}-{k}"
            started = time.perf_counter()
            key, _, value = variant.partition("=")
            changes = {key: _value(value)} if variant else {}
            row, peak, err = run_child(trainer, {**job, "out": str(out), "set": changes}, env)
            if row is None:
                print(f"{name} {trainer} {variant}: FAILED ({err})", flush=True)
                continue
            row.update(
                base=name,
                trainer=trainer,
                variant=variant,
                resolution=resolution,
                batch=job["batch"],
                steps=job["steps"],
                process_peak_rss_mb=round(peak),
                wall_s=round(time.perf_counter() - started, 1),
            )
            found.setdefault(trainer, row)
            rows.append(row)
            print(
                f"  {name:12s} {trainer:6s} {variant} {row['samples_per_s']} samples/s, training peak "
                f"{row['train_peak_rss_mb']} MB, loss {row['final_loss']}, {row['wall_s']} s",
                flush=True,
            )
        if "tuner" in found:
            sjob = {
                **job,
                "lora": found["tuner"]["lora"],
                "sample_images": args.sample_images[i],
                "sample_steps": args.sample_steps[i],
            }
            srow, speak, err = run_child("sample", sjob, env)
            if srow is None:
                print(f"{name} sampler: FAILED ({err})", flush=True)
            else:
                srow.update(
                    base=name,
                    trainer="tuner-sampler",
                    resolution=resolution,
                    process_peak_rss_mb=round(speak),
                )
                rows.append(srow)

    print()
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU x{os.cpu_count()}, torch threads default; "
        f"rival: {args.rival}; {tv_note}"
    )
    print(
        "| base | px | batch x steps | trainer | trainable | samples/s | samples/s (median step) | training peak (MB) "
        "| steady peak (MB) | process peak (MB) | final loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["trainer"] in ("tuner", "rival"):
            who = _who(r)
            print(
                f"| {r['base']} | {r['resolution']} | {r['batch']} x {r['steps']} | {who} | {r['trainable']:,} "
                f"| {r['samples_per_s']} | {r['samples_per_s_median_step']} | {r['train_peak_rss_mb']} | {r['steady_peak_rss_mb']} | {r['process_peak_rss_mb']} | {r['final_loss']} |"
            )
    print()
    print(
        "| base | throughput tuner/rival (target >= 1.5) | median-step throughput tuner/rival | training peak tuner/rival (target <= 0.7) "
        "| steady peak tuner/rival | process peak tuner/rival |"
    )
    print("|---|---|---|---|---|---|")
    for name in BASES:
        v = next((r for r in rows if r["base"] == name and r["trainer"] == "rival"), None)
        for t in (r for r in rows if r["base"] == name and r["trainer"] == "tuner" and v):
            print(
                f"| {name} {_who(t).removeprefix('tuner')} | {ratio(t['samples_per_s'], v['samples_per_s'])} "
                f"| {ratio(t['samples_per_s_median_step'], v['samples_per_s_median_step'])} "
                f"| {ratio(t['train_peak_rss_mb'], v['train_peak_rss_mb'])} "
                f"| {ratio(t['steady_peak_rss_mb'], v['steady_peak_rss_mb'])} "
                f"| {ratio(t['process_peak_rss_mb'], v['process_peak_rss_mb'])} |"
            )
    print()
    print(
        "| base | sampler steps (DDIM, CFG 5) | bare base (s/image) | merged LoRA (s/image) | merged/bare "
        "(target <= 1.02) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        if r["trainer"] == "tuner-sampler":
            print(
                f"| {r['base']} | {r['sample_steps']} | {r['bare_s_per_image']} | {r['merged_s_per_image']} "
                f"| {ratio(r['merged_s_per_image'], r['bare_s_per_image'])} |"
            )
    if args.json:
        for r in rows:
            r.pop("lora", None)
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} CPU x{os.cpu_count()}",
            "rival": str(args.rival),
            "rival_args": args.rival_args,
            "torchvision": tv_note,
            "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
