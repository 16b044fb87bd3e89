"""bench/gpu.py runs end to end in its CPU tiny mode (small SD1.5 topology, tuner's own loop) and prints
the table beside the published anchors; the full-size run needs a GPU and is not part of the tests."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_mode_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--only", "sd15",
         "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Status: run on an NVIDIA H100" in done.stdout  # the status is printed, not only written
    table = [ln for ln in done.stdout.splitlines() if ln.startswith("| sd15 (tiny) |")]
    assert len(table) == 2, done.stdout
    assert "| 2.87 | 0.181 |" in table[0] and "| 1.98 | 0.305 |" in table[1]  # anchors beside each row
    rows = json.loads(out.read_text())
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    for r in rows:
        assert r["timed_steps"] == 2 and r["seconds_per_step"] > 0
        assert 0 < r["peak_allocated_gib"] < 0.5 and r["final_loss"] == r["final_loss"]  # finite
        assert r["offloaded"] == ["vae", "text_encoder"]  # cached latents and prompts: off the device
    # checkpointing keeps fewer activations, so its measured peak is lower
    assert rows[1]["peak_allocated_gib"] < rows[0]["peak_allocated_gib"]


def test_table_ratios_only_for_full_size():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    row = {
        "family": "sd15",
        "resolution": 512,
        "gradient_checkpointing": True,
        "tiny": False,
        "card": "H100",
        "seconds_per_step": 0.2,
        "peak_allocated_gib": 1.5,
        "peak_reserved_gib": 2.0,
        "plan_tensors_gib": 1.4,
    }
    line = gpu.format_table([row]).splitlines()[-1]
    assert "| 0.76 | 0.66 |" in line  # 1.5 / 1.98 GiB, 0.2 / 0.305 s
    assert "| - | - |" in gpu.format_table([{**row, "tiny": True}]).splitlines()[-1]
    # a --features row changes the job: no ratio against the anchor, and its change is named
    feature = gpu.format_table([{**row, "label": "channels_last"}]).splitlines()[-1]
    assert "| channels_last |" in feature and "| 1.98 |" not in feature and "0.76" not in feature


def test_feature_and_breakdown_jobs_and_breakdown_table():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    jobs = gpu._jobs(argparse.Namespace(skip_base=True, only=None, features=True, breakdown=True))
    assert [j[4] for j in jobs] == [label for label, _ in gpu.FEATURES] + ["breakdown"]
    assert all(j[:3] == ("sd15", 512, True) for j in jobs) and jobs[-1][5] is True
    row = {"family": "sd15", "resolution": 512, "gradient_checkpointing": True, "breakdown_peak_gib": 1.9,
           "breakdown_gib": {"frozen weights": 1.6, "activations": 0.25},
           "plan_components_gib": {"frozen weights": 1.6, "workspace": 0.09},
           "profile": {"steps": 3, "wall_s": 0.8, "busy_s": 0.24, "ops": 1000, "top": [("aten::mm", 0.1, 30)]}}
    text = gpu.format_breakdown(row)
    assert "| frozen weights | 1.600 | 1.600 |" in text
    assert "| activations | 0.250 | - |" in text and "| workspace | - | 0.090 |" in text
    assert "device busy 0.240 s (30%)" in text and "aten::mm" in text
