"""Resumable checkpoints: one folder per step, written to a temporary name and renamed into place.

``<out>/checkpoints/step_000100/`` holds ``trainable.safetensors`` (every trainable tensor),
``state.pt`` (optimizer and LR-schedule state, step, loss history; plain tensors and numbers only, loaded with
``torch.load(weights_only=True)``) and ``recipe.toml`` (the resolved recipe that made it). Random state is
not stored: every random draw of step ``s`` comes from generators seeded by ``(seed, s)``.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.formats.io import (
    WriteError,
    fsync_dir,
    read_safetensors,
    save_safetensors,
    write_bytes_atomic,
    write_text_atomic,
)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_DIR = re.compile(r"^\.step_\d{6,}\.(\d+)\.")


@dataclass
class CheckpointState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    history: dict[str, list[float]]
    recipe_toml: str


def save_checkpoint(root: Path, state: CheckpointState, *, keep: int = 2) -> Path:
    """Write ``root/step_XXXXXX`` atomically; keep only the newest ``keep`` checkpoints (0 = all).

    The files go into a hidden temporary folder (``.step_XXXXXX.PID.RANDOM``), each fsynced, and the folder
    is renamed into place only when complete; older checkpoints are deleted only after that. A failed write
    (disk full...) removes the temporary folder and raises :class:`~tuner.formats.io.WriteError` saying that
    the previous checkpoint is intact. Temporary folders of killed runs are removed here.
    """
    final = root / f"step_{state.step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp = root / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise _checkpoint_write_error(root, final, exc) from exc
    try:
        save_safetensors(tmp / "trainable.safetensors", state.trainable, {"step": str(state.step)})
        payload = {
            "step": state.step,
            "optimizer": state.optimizer,
            "lr_scheduler": state.lr_scheduler,
            "history": state.history,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_bytes_atomic(tmp / "state.pt", buffer.getvalue())
        write_text_atomic(tmp / "recipe.toml", state.recipe_toml)
        _replace_folder(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _checkpoint_write_error(root, final, exc) from exc
        raise
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``; an existing ``final`` (same step saved again) is moved
    aside first and deleted after, so some complete copy exists at every moment."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.{os.getpid()}.old")
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _checkpoint_write_error(root: Path, final: Path, exc: OSError) -> WriteError:
    """A :class:`WriteError` about the whole checkpoint, saying which earlier one survives."""
    cause = exc.__cause__ if isinstance(exc, WriteError) and isinstance(exc.__cause__, OSError) else exc
    found = [p for p in list_checkpoints(root) if p != final]
    kept = (f"the previous checkpoint '{found[-1]}' is intact (continue later with --resume latest)"
            if found else "there is no earlier checkpoint")
    reason = cause.strerror or str(cause) or type(cause).__name__
    code = f" (errno {cause.errno})" if cause.errno else ""
    err = WriteError(
        f"cannot save checkpoint '{final}': {reason}{code}. Nothing was saved for this step and {kept}. "
        f"{WriteError.hint(cause.errno)}."
    )
    err.errno, err.filename = cause.errno, str(final)
    return err


def _remove_stale_temporaries(root: Path) -> None:
    """Delete hidden ``.step_*.PID.*`` folders left by processes that no longer run (killed mid-save)."""
    for path in root.iterdir():
        match = _TMP_DIR.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers can only be from an earlier, failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


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
