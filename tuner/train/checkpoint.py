"""Resumable checkpoints: one folder per step, written to a temporary name and renamed into place.

``<out>/checkpoints/step_000100/`` holds ``trainable.safetensors`` (every trainable tensor),
``state.pt`` (optimizer and LR-schedule state, step, loss history; plain tensors and numbers only, loaded with
``torch.load(weights_only=True)``) and ``recipe.toml`` (the resolved recipe that made it). Random state is
not stored: every random draw of step ``s`` comes from generators seeded by ``(seed, s)``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.formats.io import read_safetensors, save_safetensors

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class CheckpointState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    history: dict[str, list[float]]
    recipe_toml: str


def save_checkpoint(root: Path, state: CheckpointState, *, keep: int = 2) -> Path:
    """Write ``root/step_XXXXXX`` atomically; keep only the newest ``keep`` checkpoints (0 = all)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_safetensors(tmp / "trainable.safetensors", state.trainable, {"step": str(state.step)})
        payload = {
            "step": state.step,
            "optimizer": state.optimizer,
            "lr_scheduler": state.lr_scheduler,
            "history": state.history,
        }
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / "recipe.toml").write_text(state.recipe_toml, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """``--resume`` value -> checkpoint folder. ``latest``/``auto`` = newest under ``output_dir/checkpoints``."""
    if spec in ("latest", "auto"):
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise TunerError(f"--resume {spec}: no checkpoint under '{output_dir / 'checkpoints'}'")
        return found[-1]
    path = Path(spec)
    if not (path / "state.pt").is_file():
        raise TunerError(
            f"--resume: '{spec}' is not a checkpoint folder (expected state.pt and trainable.safetensors in it; "
            f"checkpoints live in <output>/checkpoints/step_NNNNNN, or pass --resume latest)"
        )
    return path


def load_checkpoint(path: Path) -> CheckpointState:
    """Read a checkpoint folder without executing any pickled code."""
    trainable, _ = read_safetensors(path / "trainable.safetensors")
    try:
        payload = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not ours or damaged"
        raise TunerError(f"cannot read checkpoint state '{path / 'state.pt'}': {exc}") from exc
    recipe_file = path / "recipe.toml"
    return CheckpointState(
        step=int(payload["step"]),
        trainable=trainable,
        optimizer=payload["optimizer"],
        lr_scheduler=payload["lr_scheduler"],
        history=payload.get("history", {}),
        recipe_toml=recipe_file.read_text(encoding="utf-8") if recipe_file.exists() else "",
    )
