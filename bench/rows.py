"""Each benchmark configuration runs in a Python process of its own (a clean memory peak, no state carried
over from the last one); the child prints its result as one ``ROW {json}`` line on stdout."""

from __future__ import annotations

import json
import resource
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def emit(row: dict) -> None:
    """What a child prints: its one result line."""
    print("ROW " + json.dumps(row), flush=True)


def child_row(
    cmd: Sequence[str], *, label: str, env: Mapping[str, str], cwd: Path, timeout: float | None = None
) -> dict | None:
    """Run ``cmd`` and return the row it printed; on a timeout, a failed exit or no row, say so under
    ``label`` (with the end of its stderr) and return None."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env), cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{label}: timed out after {timeout} s", flush=True)
        return None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
    if done.returncode != 0 or line is None:
        print(f"{label}: FAILED (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(line[4:])


def high_water_mb() -> float:
    """This process's peak resident size so far (``ru_maxrss``; Linux's ``VmHWM``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_high_water() -> bool:
    """Reset the peak to the current resident size (Linux >= 4.0: ``/proc/self/clear_refs`` 5). False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_at_the_end(loop, peak: dict[str, float], key: str) -> None:
    """Replace the training loop's final checkpoint and export (``loop``: the module ``tuner.train.loop``) by
    a recorder of the peak so far under ``peak[key]``: the figures are training's, not I/O's."""

    def stop_here(*_args, **_kwargs):
        peak.setdefault(key, high_water_mb())
        return []

    loop.save, loop.export_adapter = stop_here, stop_here


def set_keys(recipe, values: Mapping[str, object]) -> None:
    """Set dotted recipe keys (``{"train.shard_frozen": True}``) on a ``Recipe`` object, in place."""
    for key, value in values.items():
        section, name = key.split(".")
        setattr(getattr(recipe, section), name, value)


def method_recipe(method: str, out: Path, *, optimizer: str, checkpointing: bool):
    """A one-configuration recipe on the embedded base's datasets for ``method`` (``lora``,
    ``dreambooth_lora``, ``dreambooth``, ``textual_inversion``, ``pivotal``): prior preservation with two
    class images for the DreamBooth ones, the ``<pink>`` token for the embedding ones; no checkpoints or
    previews. Callers set resolution, batch and steps."""
    from tuner.config.schema import Recipe

    embedding = method in ("textual_inversion", "pivotal")
    r = Recipe()
    r.model.base = "tiny"
    r.data.path = str(Path(__file__).resolve().parents[1] / "datasets" / ("pink" if embedding else "sks_star"))
    r.output.dir, r.output.name = str(out), "bench"
    r.train.checkpoint_every, r.preview.every = 0, 0
    r.optim.optimizer, r.train.gradient_checkpointing = optimizer, checkpointing
    r.adapter.method = "dreambooth" if method == "dreambooth" else method.replace("dreambooth_lora", "lora")
    if method in ("dreambooth", "dreambooth_lora"):
        r.prior.enabled = True
        r.prior.class_prompts = ["a blue star on a black background"]
        r.prior.class_dir = str(out / "class_images")
        r.prior.num_images, r.prior.steps = 2, 2
    if embedding:
        r.embedding.tokens, r.embedding.init_words = ["<pink>"], ["purple"]
    return r
