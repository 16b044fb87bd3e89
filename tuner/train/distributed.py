"""Data-parallel training on several processes (one per device; on CPU, gloo): sharding, shared random draws,
and gradient averaging (the ``--processes N`` launcher is ``tuner.train.launch``).

accelerate starts the processes (``accelerate launch`` or ``torchrun``) and owns the process group; this
module holds what tuner does with it. The contract, for ``W`` processes with per-process batch ``b``:

* The global micro-batch ``k`` is the ``W`` local micro-batches ``k*W + r`` (``r`` = rank) of the dataset's
  stream (:meth:`~tuner.data.dataset.TrainDataset.batch_samples`). Without buckets that is positions
  ``k*W*b .. k*W*b + W*b - 1``: exactly micro-batch ``k`` of one process with batch ``W*b``, so a run can
  resume with another process count (same ``W*b``) and continue the same data order.
* Every random tensor of a step (VAE sampling, noise, noise offset, timesteps) is drawn by every process for
  the whole global batch from the step's generator, and each keeps its own rows: sample ``i`` gets the
  same numbers whichever process trains it. (In-model randomness, e.g. LoRA dropout, is per process.)
* Each process backpropagates the mean loss of its rows; :func:`sync_gradients` then averages the
  gradients, which equals the gradient of the global batch's mean loss. The modules are never wrapped in
  DDP: the loop calls the base's modules directly, so one explicit all-reduce per optimizer step replaces
  DDP's hooks (and gradient accumulation needs no ``no_sync``).
* Only the main process (rank 0) writes files, logs and shows progress.
* With ``optim.shard_states`` the optimizer is torch's ``ZeroRedundancyOptimizer`` (ZeRO stage 1): each
  process keeps the states of its share of the tensors; :func:`gather_optimizer_state` collects them on the
  main process before a checkpoint, in the ordinary (unsharded) layout, so any process count resumes it.

With ``W = 1`` every function here is the identity, so a single process runs exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GRADIENT_BUCKET = 1 << 25
"""Gradient elements all-reduced per call (32 Mi; bounds the flat buffer's extra memory)."""


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` data-parallel processes (rank 0 is the main process)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batch(self, micro_step: int) -> int:
        """Index, in the dataset's micro-batch stream, of this process's part of global micro-batch
        ``micro_step``."""
        return micro_step * self.world + self.rank

    def rows(self, parts: Sequence[int]) -> torch.Tensor:
        """This process's rows of a tensor drawn for the global batch. The global batch is laid out part
        by part (instance images, then class images), each part as ``world`` blocks, one per rank, of this
        process's size ``n``: in part ``p`` this process owns rows ``offset_p + rank*n .. + n``."""
        picks, offset = [], 0
        for n in parts:
            picks.append(torch.arange(offset + self.rank * n, offset + (self.rank + 1) * n))
            offset += self.world * n
        return torch.cat(picks)

    def randn(
        self, shape: Sequence[int], generator: torch.Generator, parts: Sequence[int] = ()
    ) -> torch.Tensor:
        """``torch.randn(shape)`` for this process's ``shape[0]`` rows of the global batch (``parts``: the
        local sizes of its parts, default one part)."""
        if self.world == 1:
            return torch.randn(tuple(shape), generator=generator)
        full = torch.randn((self.world * shape[0], *shape[1:]), generator=generator)
        return full[self.rows(parts or (shape[0],))]

    def randint(
        self, high: int, n: int, generator: torch.Generator, parts: Sequence[int] = ()
    ) -> torch.Tensor:
        """``torch.randint(0, high, (n,))`` for this process's ``n`` rows of the global batch."""
        if self.world == 1:
            return torch.randint(0, high, (n,), generator=generator)
        full = torch.randint(0, high, (self.world * n,), generator=generator)
        return full[self.rows(parts or (n,))]


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Give every process the main process's values of ``params`` (as DDP does when it wraps a model), so
    all start from the same weights whatever their random streams did."""
    import torch.distributed as dist

    if world == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def sync_gradients(params: Sequence[torch.nn.Parameter], world: int, device: torch.device) -> None:
    """Average ``.grad`` over the processes (sum, divide by ``world``), in place; call after the last
    backward of a step. A parameter without a gradient on some processes counts zeros there, and stays
    without one only where no process has one (as the optimizer would skip it in a single process)."""
    import torch.distributed as dist

    if world == 1:
        return
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(have)
    grads = []
    for p, count in zip(params, have.tolist(), strict=True):
        if count and p.grad is None:
            p.grad = torch.zeros_like(p)
        if count:
            grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most :data:`GRADIENT_BUCKET` elements each (a larger
    tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        last = out[-1] if out else None
        if (
            last is None
            or size + g.numel() > GRADIENT_BUCKET
            or (g.dtype, g.device) != (last[0].dtype, last[0].device)
        ):
            out.append([g])
            size = g.numel()
        else:
            last.append(g)
            size += g.numel()
    return out


def step_totals(loss: float, stop: bool, world: int, device: torch.device) -> tuple[float, bool]:
    """The step's loss averaged over the processes, and whether any process was asked to stop: one
    all-reduce, so every process takes the same decisions (skip a non-finite step, save and stop)."""
    import torch.distributed as dist

    if world == 1:
        return loss, stop
    totals = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return float(totals[0]) / world, bool(totals[1] > 0)


def gather_optimizer_state(optimizer: torch.optim.Optimizer, world: int) -> None:
    """Every process calls this before the main process saves a checkpoint: a sharded optimizer (ZeRO-1)
    sends its states to process 0, whose ``state_dict()`` is then the whole, unsharded state. A no-op for an
    ordinary optimizer or one process."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if world > 1 and hasattr(inner, "consolidate_state_dict"):
        inner.consolidate_state_dict(to=0)


SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU")
"""accelerate's distributed types tuner trains with: one process, or data parallel (one device each)."""


def check_launch(distributed_type: str, *, world: int, device_spec: str, fused_backward: bool) -> None:
    """Refuse a launch tuner cannot train correctly, before any model loads: FSDP, DeepSpeed and the like
    (the loop calls the base's modules directly, which a sharding wrapper does not allow), one named device
    for several processes, and the fused backward pass (its steps happen inside backward, before the
    gradients could be averaged)."""
    from tuner.errors import TunerError

    if distributed_type not in SUPPORTED:
        raise TunerError(
            f"accelerate is configured for {distributed_type}, which tuner does not support yet (its loop calls "
            "the models directly and averages gradients itself). Use a data-parallel config (distributed_type: "
            "MULTI_GPU, e.g. docs/accelerate/ddp.yaml); to save memory see docs/distributed.md"
        )
    if world > 1 and ":" in device_spec:
        raise TunerError(
            f"train.device = {device_spec!r} names one device, but {world} processes need one each: use 'auto' "
            "or the device type (each process gets its own device from the launcher)"
        )
    if world > 1 and fused_backward:
        raise TunerError(
            f"optim.fused_backward steps each tensor inside backward, before the {world} processes' gradients "
            "are averaged: turn it off for data-parallel training (optim.fused_backward = false)"
        )
