"""Experiment trackers (``train.log_with``): TensorBoard and Weights & Biases, each only when installed.

A tracker receives, per optimizer step, the loss, learning rate and gradient norm, and each preview grid
as an image; the resolved recipe is recorded once. TensorBoard event files go to
``<output>/logs/tensorboard`` (``tensorboard --logdir <output>/logs``); Weights & Biases runs offline
unless the user has configured it (``WANDB_MODE``), with its files under ``<output>/logs``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tuner.errors import TunerError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""``train.log_with`` value -> the package it needs."""


class Tracker(Protocol):
    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def image(self, step: int, name: str, path: Path) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """``log_with = "none"``: records nothing."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def image(self, step: int, name: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


def missing_package(kind: str) -> str | None:
    """The problem with ``train.log_with = kind`` on this machine (its package missing), or None."""
    package = PACKAGES.get(kind)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (f"train.log_with = {kind!r} needs the {package} package: `pip install {package}` (or "
            f"`pip install 'tuner-diffusion[{package}]'`), or set train.log_with = \"none\"")


def open_tracker(kind: str, folder: Path, *, name: str, recipe_toml: str, config: Mapping[str, Any]) -> Tracker:
    """A tracker of ``kind`` (``none``, ``tensorboard``, ``wandb``) writing under ``folder / "logs"``."""
    if kind == "none":
        return NullTracker()
    problem = missing_package(kind)
    if problem:
        raise TunerError(problem)
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        return TensorBoardTracker(logs / "tensorboard", recipe_toml)
    if kind == "wandb":
        return WandbTracker(logs, name, config)
    raise TunerError(f"train.log_with = {kind!r}: expected one of none, {', '.join(PACKAGES)}")


class TensorBoardTracker:
    def __init__(self, folder: Path, recipe_toml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        # four-space indent: TensorBoard's text plugin renders Markdown, which keeps it as code
        self.writer.add_text("recipe", "\n".join("    " + line for line in recipe_toml.splitlines()), 0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, step: int, name: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            self.writer.add_image(name, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    def __init__(self, folder: Path, name: str, config: Mapping[str, Any]):
        import os

        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # tuner never contacts a server on its own
        self.wandb = wandb
        self.run = wandb.init(project="tuner", name=name, dir=str(folder), config=dict(config))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()
