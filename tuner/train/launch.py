"""``tuner train --processes N``: start N data-parallel processes on this machine (``tuner.train.distributed``).

Kept apart from the training modules so that the launching process imports nothing heavy (no torch): it
only waits for the launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence


def launched_processes() -> int:
    """Processes of the job this process belongs to (``WORLD_SIZE`` set by accelerate/torchrun; else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def relaunch(argv: Sequence[str], processes: int) -> int:
    """Run ``tuner <argv>`` as ``processes`` processes on this machine and return their exit status.

    The launcher is ``torch.distributed.run --standalone`` (it picks a free port itself). Signals: the
    terminal's Ctrl-C reaches the launcher directly (same process group), which passes it on to each worker
    once, so they finish the step and save a checkpoint (within the launcher's 30 s grace); a SIGTERM sent to
    this process is forwarded the same way. The workers parse the same ``argv`` (``--processes N``
    included) and, seeing ``WORLD_SIZE``, train. On CPU each
    process gets one intra-op thread unless ``OMP_NUM_THREADS`` is set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "tuner.cli",
        *argv,
    ]
    proc = subprocess.Popen(command, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the launcher got the same Ctrl-C and is stopping the workers; wait for them
    finally:
        signal.signal(signal.SIGTERM, previous)
