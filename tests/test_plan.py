"""tuner plan: parameter arithmetic on known architectures, trainable counts against real adapters, the
activation model against what autograd really keeps, and one measured CPU step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tuner.config.schema import Recipe
from tuner.plan.activations import estimate_unet
from tuner.plan.estimate import GB, MB, fit, optimizer_state_bytes, plan_recipe, presets
from tuner.plan.skeleton import build_skeleton, param_count

ROOT = Path(__file__).resolve().parents[1]


def _recipe(method: str = "lora", **train) -> Recipe:
    r = Recipe()
    r.adapter.method = method  # type: ignore[assignment]
    if method in ("textual_inversion", "pivotal"):
        r.embedding.tokens, r.embedding.init_words = ["<pink>"], ["purple"]
    for key, value in train.items():
        setattr(r.train, key, value)
    return r


def test_known_parameter_counts_from_meta():
    sd15 = build_skeleton("tiny", "sd15")
    assert param_count(sd15.unet) == 859_520_964
    assert next(iter(sd15.unet.parameters())).device.type == "meta"
    sdxl = build_skeleton("tiny", "sdxl")
    assert param_count(sdxl.unet) == 2_567_463_684
    assert set(sdxl.text_encoders) == {"text_encoder", "text_encoder_2"}


@pytest.mark.parametrize(
    "method,targets",
    [
        ("lora", "attention"),
        ("lora", "locon"),
        ("pivotal", "kohya"),
        ("textual_inversion", "attention"),
        ("dreambooth", "attention"),
    ],
)
def test_trainable_count_matches_real_attach(method, targets):
    from tuner.models.base import load_base
    from tuner.train.methods import METHODS
    from tuner.train.setup import adapter_settings

    r = _recipe(method)
    r.adapter.targets = targets  # type: ignore[assignment]
    base = load_base("tiny")
    trained = METHODS[method].attach(base, adapter_settings(r))
    real = sum(p.numel() for m in trained.values() for p in m.parameters() if p.requires_grad)
    assert plan_recipe(r).trainable_params == real


@pytest.mark.parametrize("method,te", [("textual_inversion", False), ("pivotal", True), ("lora", True),
                                       ("dreambooth", True)])
def test_trainable_count_matches_real_attach_on_sdxl(method, te, tmp_path_factory):
    """SDXL has two text encoders: a token's rows, text-encoder LoRAs and full text-encoder training count
    in both (checked on SDXL's topology at tiny widths, against what the trainer really attaches)."""
    from tuner.models.base import export_base
    from tuner.models.small import small_base
    from tuner.train.methods import METHODS
    from tuner.train.setup import adapter_settings

    r = _recipe(method)
    r.adapter.train_text_encoder = te
    base = small_base("sdxl")
    folder = export_base(base, tmp_path_factory.mktemp("xl") / "base")
    trained = METHODS[method].attach(base, adapter_settings(r))
    # each trained tensor once (a text encoder with a LoRA also holds the token rows it trains)
    unique = {id(p): p.numel() for m in trained.values() for p in m.parameters() if p.requires_grad}
    assert plan_recipe(r, skeleton=build_skeleton(str(folder))).trainable_params == sum(unique.values())


def test_optimizer_state_arithmetic():
    assert optimizer_state_bytes("adamw", [(1000, 10)]) == 80_000
    # bitsandbytes: 8-bit states from 4096 values on (2 bytes + two fp32 absmax per 256-block), fp32 below
    assert optimizer_state_bytes("adamw8bit", [(4096,)]) == 2 * 4096 + 8 * 16
    assert optimizer_state_bytes("adamw8bit", [(100,)]) == 800
    assert optimizer_state_bytes("adafactor", [(100, 30)]) == 4 * 130


def test_sd15_lora_plan_and_presets():
    sk = build_skeleton("tiny", "sd15")
    r = _recipe("lora", batch_size=1, mixed_precision="bf16")
    plan = plan_recipe(r, skeleton=sk)
    assert plan.component("frozen weights") == 859_520_964 * 2  # prompts cached: the text encoder leaves
    uncached = plan_recipe(
        _recipe("lora", batch_size=1, mixed_precision="bf16", cache_prompts=False), skeleton=sk
    )
    assert uncached.component("frozen weights") == (859_520_964 + 123_060_480) * 2
    # SimpleTuner measured 2.87 GiB on an H100 for SD1.5 LoRA at 512 px, batch 1, bf16: same ballpark
    assert 2.0 * GB < plan.total_bytes < 4.0 * GB
    ckpt = plan_recipe(
        _recipe("lora", batch_size=1, mixed_precision="bf16", gradient_checkpointing=True), skeleton=sk
    )
    assert ckpt.component("activations") < plan.component("activations") / 3
    assert plan.step_flops > 3 * 0.7e12  # SD1.5 UNet forward at 512 px is about 0.8 TFLOP

    full = _recipe("dreambooth", batch_size=2)
    tight = fit(sk, full, 12)
    assert tight is not None and tight.device_bytes <= 12 * GB
    assert tight.settings.optimizer == "adamw8bit" or tight.settings.mixed_precision != "no"
    rows = presets(sk, full)
    assert [row["vram_gb"] for row in rows] == [8, 12, 16, 24]
    assert rows[-1]["fits"] and all(row["predicted_gb"] <= row["vram_gb"] for row in rows if row["fits"])


def _saved_bytes(unet, latents: torch.Tensor, context: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward pass: unique storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(latents, torch.full((latents.shape[0],), 500), encoder_hidden_states=context).sample.sum()
    return sum(seen.values())


@pytest.mark.parametrize(
    "method,targets",
    [
        ("lora", "attention"),
        ("lora", "kohya"),
        ("dreambooth", "attention"),
        ("textual_inversion", "attention"),
    ],
)
def test_activation_model_matches_autograd(method, targets):
    """The analytic per-block count against the bytes autograd really saves (fp32, CPU, 32x32 latents)."""
    from tuner.models.base import load_base
    from tuner.plan.estimate import unet_trained
    from tuner.train.methods import METHODS
    from tuner.train.setup import adapter_settings

    r = _recipe(method)
    r.adapter.targets = targets  # type: ignore[assignment]
    base = load_base("tiny")
    METHODS[method].attach(base, adapter_settings(r))
    base.unet.train()
    latents = torch.randn(2, 4, 32, 32)
    context = torch.randn(2, 32, 128, requires_grad=method == "textual_inversion")
    measured = _saved_bytes(base.unet, latents, context)
    predicted = estimate_unet(
        base.unet,
        height=32,
        width=32,
        context=32,
        batch=2,
        act_bytes=4,
        checkpointing=False,
        trained=unet_trained(r),
    ).saved_bytes
    assert abs(predicted - measured) / measured < 0.15, (predicted / MB, measured / MB)


_STEP_PEAK = textwrap.dedent("""
    import gc, json, sys, tempfile
    import tuner.train.loop as loop
    from tuner.config.schema import Recipe
    from tuner.plan.estimate import plan_recipe
    from tuner.plan.measure import TensorMemory
    from tuner.train.setup import setup_run

    loop.save, loop.export_adapter = (lambda *a, **k: None), (lambda *a, **k: [])
    rows = []
    for optimizer, checkpointing in (("adamw", False), ("adamw8bit", True)):
        r = Recipe()
        r.model.base, r.data.path, r.data.resolution = "tiny", sys.argv[1], 128
        r.adapter.method, r.train.batch_size, r.train.steps = "dreambooth", 2, 1
        r.optim.optimizer, r.train.gradient_checkpointing = optimizer, checkpointing
        r.output.dir, r.train.checkpoint_every, r.preview.every = tempfile.mkdtemp(), 0, 0
        run = setup_run(r, log=lambda *a: None)
        loop.train(run, log=lambda *a: None)  # warm-up: caches, offload, optimizer states
        r.train.steps, run.start_step = 3, 1
        off = [run.base.vae if n == "vae" else run.base.text_encoders[n] for n in run.offloaded]
        with TensorMemory("cpu", trainable=run.params, optimizer=run.optimizer, exclude=off) as mem:
            loop.train(run, log=lambda *a: None)
        plan = plan_recipe(r, device="cpu")
        rows.append({"measured": mem.peak, "at_peak": mem.at_peak.by_category, "predicted": plan.total_bytes,
                     "components": {c.name: c.bytes for c in plan.components}})
        run.accelerator.free_memory()  # accelerate keeps the prepared models and optimizer otherwise
        del run, mem
        gc.collect()
    print("ROWS " + json.dumps(rows))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="runs tuner's loop in a child process")
def test_plan_matches_measured_tensor_peak_on_cpu():
    """A full fine-tune of the tiny base, 128 px, batch 2, through tuner's own loop in a fresh process: the
    live-tensor peak of two steps (what max_memory_allocated reports on a GPU) against the plan, within 10%
    in total (the issue asks 15%; measured 1.00-1.01), with weights and optimizer states exact. Plain AdamW peaks as backward starts (activations,
    no gradients yet); 8-bit AdamW + checkpointing peaks late in backward, where most gradients exist:
    the sum of all activations and all gradients (the old upper bound) is never alive at once."""
    done = subprocess.run(
        [sys.executable, "-c", _STEP_PEAK, str(ROOT / "datasets" / "sks_star")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"},
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROWS ")), None)
    assert line, done.stderr[-2000:]
    plain, ckpt = json.loads(line[5:])
    for row in (plain, ckpt):
        assert abs(row["predicted"] - row["measured"]) / row["measured"] < 0.10, (
            row["predicted"] / MB,
            row["measured"] / MB,
        )
        for name in ("trainable weights", "optimizer states"):
            assert abs(row["components"][name] - row["at_peak"][name]) <= 0.01 * row["at_peak"][name], name
    assert plain["at_peak"].get("gradients", 0) < 0.01 * plain["at_peak"]["trainable weights"]
    assert ckpt["at_peak"]["gradients"] > 0.5 * ckpt["at_peak"]["trainable weights"]
    assert ckpt["components"]["gradients"] > 0.5 * ckpt["components"]["trainable weights"]


def test_tensor_memory_counts_storages_once_and_frees_them():
    from tuner.plan.measure import TensorMemory

    with TensorMemory("cpu") as mem:
        start = mem.current
        a = torch.empty(2**18)  # 1 MiB
        view = a.view(512, 512)  # same storage: counted once
        assert mem.current - start == MB
        del a, view
        assert mem.current == start
        b = torch.empty(2**19)  # 2 MiB
        assert mem.peak - start == 2 * MB
        del b


def test_backward_walk_full_finetune_below_naive_sum():
    """SD1.5 full fine-tune, 512 px, bf16: the peak moment holds fewer bytes than all activations plus all
    gradients, and at least each alone."""
    from tuner.plan.activations import backward_peak

    sk = build_skeleton("tiny", "sd15")
    est = estimate_unet(sk.unet, height=64, width=64, context=77, batch=1, act_bytes=2, checkpointing=False)
    moment = backward_peak(est, unet_trains=True)
    grads = 4 * param_count(sk.unet)
    peak = moment.saved + moment.workspace + 4 * moment.gradient_params
    assert max(est.saved_bytes, grads) < peak < est.saved_bytes + grads
    lora = backward_peak(est, unet_trains=False)
    assert lora.gradient_params == 0 and lora.saved + lora.workspace >= est.saved_bytes


def test_fit_uses_fused_backward_for_full_finetune_and_presets_cli(capsys):
    from tuner.cli import main

    sk = build_skeleton("tiny", "sd15")
    r = _recipe("dreambooth", batch_size=1, mixed_precision="bf16", gradient_checkpointing=True)
    r.optim.optimizer = "adamw8bit"
    assert plan_recipe(r, skeleton=sk).device_bytes > 8 * GB
    fitted = fit(sk, r, 8)
    # the cheapest fit keeps resolution and checkpointing and frees the gradients instead
    assert fitted is not None and fitted.settings.fused_backward and fitted.settings.resolution == 512
    rows = presets(sk, r)
    assert "optim.fused_backward=true" in rows[0]["changes"] and "train.max_grad_norm=0" in rows[0]["changes"]
    assert (
        main(["plan", str(ROOT / "recipes" / "sd15" / "dreambooth.toml"), "--family", "sd15", "--presets"])
        == 0
    )
    out = capsys.readouterr().out
    assert "| 8 GB |" in out and "| 24 GB |" in out and "fused_backward" in out


def test_cli_plan_json_and_vram(capsys):
    from tuner.cli import main

    recipe = ROOT / "recipes" / "tiny" / "sks_star_lora.toml"
    assert main(["plan", str(recipe), "--json", "--vram", "8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["family"] == "tiny" and doc["plan"]["total_mb"] > 0
    assert [row["vram_gb"] for row in doc["presets"]] == [8, 12, 16, 24]
    assert (
        main(["plan", str(ROOT / "recipes" / "sd15" / "dreambooth.toml"), "--family", "sd15", "--vram", "8"])
        == 0
    )
    out = capsys.readouterr().out
    assert "| activations" in out and "presets" in out and "RTX 4090" in out


H100_ROWS = sorted((ROOT / "bench" / "results").glob("gpu*_nvidia-h100-80gb-hbm3_*.json"))
STALE_MEMORY = {"full fine-tune, Adafactor + fused backward"}
"""Measured before autocast stopped caching weight casts (a bf16 copy of the model, 1.6 GiB, then lived
through the forward pass): its time still stands, its memory is the old code's."""


@pytest.mark.parametrize("path", H100_ROWS, ids=lambda p: p.stem)
def test_plan_agrees_with_the_h100_measurements(path):
    """bench/gpu.py's figures from an H100: the predicted tensor peak within 15% of max_memory_allocated and
    the H100 time range around the measured median step."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu import build_recipe
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = json.loads(path.read_text())
    assert rows
    for row in rows:
        recipe = build_recipe(row["family"], row["resolution"], row["gradient_checkpointing"], "cuda", Path("/x"),
                              tuple(row.get("overrides", ())))
        plan = plan_recipe(recipe, family=row["family"])
        name = f"{row['family']} ckpt={row['gradient_checkpointing']} {row.get('label', '')}"
        if row.get("label", "") not in STALE_MEMORY:
            assert plan.total_bytes / GB == pytest.approx(row["peak_allocated_gib"], rel=0.15), name
        h100 = next(t for t in plan.times if t["device"].startswith("H100"))
        assert h100["seconds_min"] <= row["seconds_per_step"] <= h100["seconds_max"], (name, h100)


def test_state_shares_follow_zero_partitioning():
    """torch's ZeroRedundancyOptimizer: largest tensor first, each to the process with the fewest values
    (ties to the lowest rank). AdamW keeps 8 bytes per value."""
    from tuner.plan.estimate import state_shares

    shapes = [(10,), (40,), (30,), (20,), (5, 2)]
    # 40 -> 0, 30 -> 1, 20 -> 1 (30 < 40), 10 -> 0 (40 < 50), (5, 2) -> 0 (50 = 50: the lowest rank)
    assert state_shares("adamw", [shapes], 2) == [8 * 60, 8 * 50]
    assert state_shares("adamw", [shapes], 1) == [8 * 110]
    # groups one after another, the counts carried over: (30,) -> 0, then (20,) -> 1, (15,) -> 1
    assert state_shares("adamw", [[(30,)], [(15,), (20,)]], 2) == [8 * 30, 8 * 35]


def test_plan_per_process_with_sharded_states():
    recipe = _recipe("dreambooth", mixed_precision="bf16", gradient_checkpointing=True)
    one = plan_recipe(recipe, family="sd15")
    four = plan_recipe(recipe, family="sd15", processes=4)
    recipe.optim.shard_states = True
    sharded = plan_recipe(recipe, family="sd15", processes=4)
    s_one, s_four, s_sharded = (p.component("optimizer states") for p in (one, four, sharded))
    assert s_four == s_one  # unsharded: every process keeps all of them
    assert s_one / 4 <= s_sharded < s_one / 4 + 8 * 23_000_000  # within one large tensor
    assert "sharded over 4 processes" in next(c.note for c in sharded.components if c.name == "optimizer states")
    assert sharded.total_bytes < four.total_bytes
    # ZeRO-2: the gradients too, at the backward peak and at the optimizer step
    recipe.optim.shard_gradients = True
    zero2 = plan_recipe(recipe, family="sd15", processes=4)
    assert zero2.component("optimizer states") == s_sharded
    g_sharded, g_zero2 = sharded.component("gradients"), zero2.component("gradients")
    assert g_zero2 < g_sharded / 2 and g_zero2 >= 4 * 859_520_964 / 4  # at least this process's share
    assert zero2.total_bytes < sharded.total_bytes
    # both peak at the optimizer step; ZeRO-1 averages there through a flat bucket, ZeRO-2 sent its buckets
    # during backward and only divides its share in place
    zero1_step, zero2_step = (next(c.note for c in p.components if c.name == "workspace") for p in (sharded, zero2))
    assert "gradient bucket" in zero1_step and "gradient bucket" not in zero2_step
    recipe.optim.shard_states = False  # shard_gradients implies it
    assert plan_recipe(recipe, family="sd15", processes=4).total_bytes == zero2.total_bytes
    # several processes average their gradients through a flat bucket at the optimizer step
    step_lora = plan_recipe(_recipe("lora"), family="sd15", processes=2)
    assert step_lora.total_bytes >= plan_recipe(_recipe("lora"), family="sd15").total_bytes


def test_plan_per_process_with_sharded_frozen_weights():
    recipe = _recipe("lora", mixed_precision="bf16")
    plain = plan_recipe(recipe, family="sd15", processes=2)
    recipe.train.shard_frozen = True
    split = plan_recipe(recipe, family="sd15", processes=2)
    unet_linear_conv = 2 * 858_000_000  # bf16 bytes of the UNet's Linear/Conv2d weights (of 859.5M)
    saved = plain.component("frozen weights") - split.component("frozen weights")
    assert unet_linear_conv / 2 * 0.99 < saved < 2 * 859_520_964 / 2
    assert split.component("workspace") > plain.component("workspace")  # one layer's gathered weight
    assert "split over 2 processes" in next(c.note for c in split.components if c.name == "frozen weights")
    one_split = plan_recipe(recipe, family="sd15")  # one process: nothing to split with
    recipe.train.shard_frozen = False
    assert one_split.total_bytes == plan_recipe(recipe, family="sd15").total_bytes


def test_fit_for_several_processes_shards_instead_of_fusing(capsys):
    """tuner train refuses the fused backward with several processes; sharding the states is the cheap
    change instead, and the CLI says so."""
    from tuner.cli import main

    assert main(["plan", str(ROOT / "recipes" / "sd15" / "dreambooth.toml"), "--family", "sd15",
                 "--set", "model.base=tiny", "--processes", "4", "--vram", "9"]) == 0
    out = capsys.readouterr().out
    assert "4 processes (figures per process)" in out
    fix = next(ln for ln in out.splitlines() if "fits with" in ln)
    assert "optim.shard_states=true" in fix and "fused_backward" not in fix
