"""Each benchmark configuration runs in a Python process of its own (a clean memory peak, no state carried
over from the last one); the child prints its result as one ``ROW {json}`` line on stdout."""

from __future__ import annotations

import json
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
