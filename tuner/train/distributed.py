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
* With ``optim.shard_gradients`` (ZeRO stage 2) :class:`ShardedGradients` replaces the all-reduce: each
  gradient goes, during backward, to the process that owns its states, and the others drop it.

With ``W = 1`` every function here is the identity, so a single process runs exactly as before.
"""

from __future__ import annotations

import math
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


def owners(params: Sequence[torch.nn.Parameter], owned: set[int], shard: Shard, device: torch.device) -> list[int]:
    """The rank that owns each of ``params``, from each process's own share (``owned``: ids of its
    parameters): one all-reduce. Refuses a partition where a tensor has no owner or several."""
    import torch.distributed as dist

    mine = torch.tensor([id(p) in owned for p in params], dtype=torch.int64, device=device)
    count, rank = mine.clone(), mine * shard.rank
    dist.all_reduce(count)
    dist.all_reduce(rank)
    if not bool((count == 1).all()):
        raise RuntimeError(f"the sharded optimizer's partition gives {int((count != 1).sum())} tensors no single owner")
    return rank.tolist()


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
    for positions in _buckets(grads):
        bucket = [grads[i] for i in positions]
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def shard_bucket(total: int) -> int:
    """Elements per :class:`ShardedGradients` bucket for ``total`` trained elements: at most
    :data:`GRADIENT_BUCKET`, and at least 8 buckets per job, so that a small one (a LoRA) is sent in parts too."""
    return max(1, min(GRADIENT_BUCKET, total // 8))


class ShardedGradients:
    """ZeRO stage 2 (``optim.shard_gradients``): each process keeps only the averaged gradients of the tensors
    whose optimizer states it owns (``owner``: parameter index -> rank, the sharded optimizer's partition).

    Gradients are reduced during backward, as they become ready, in fixed buckets of parameters (at most
    :func:`shard_bucket` elements each). Backward makes gradients ready in about the reverse of the order the forward
    pass used the weights, so the buckets are laid out in that order: hooks on ``modules`` (the trained
    modules) record the first forward pass's order, and at the first gradient process 0's order is
    broadcast, so every process has the same buckets. A bucket is sent once all its parameters have their
    gradient, and buckets go strictly in index order, so every process makes the same calls in the same
    order whatever order its backward runs in. Each bucket is one ``reduce`` per owner: the owner adds the
    sum to its own buffer; every process then drops those ``.grad`` tensors, so between buckets only the
    unsent gradients and the owned sums are alive. :meth:`flush` (after each backward) sends what is left,
    counting a missing gradient as zeros; :meth:`finish` (once per optimizer step) hands each owner its sums
    divided by ``world`` as ``.grad``. A tensor no process had a gradient for stays without one (the
    optimizer skips it, as in one process). Works with gradient accumulation: each micro-batch's gradients
    are sent and summed into the owned buffers.

    ``peak`` is the most gradient elements this process held at once (measured on the ``.grad`` tensors
    themselves, just before each bucket is sent), against ``total``."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], owner: Sequence[int], rank: int, world: int,
        modules: Sequence[torch.nn.Module],
    ) -> None:
        self.params, self.owner, self.rank, self.world = list(params), list(owner), rank, world
        self.total = sum(p.numel() for p in self.params)
        self.limit = shard_bucket(self.total)
        self.buckets: list[list[int]] = []  # laid out at the first gradient
        self.used: dict[int, None] = {}  # parameter indices in the order the first forward pass used them
        self.sums: dict[int, torch.Tensor] = {}
        self.seen: dict[int, bool] = {}  # owned tensors: whether any process had a gradient
        self.peak = 0
        index = {id(p): i for i, p in enumerate(self.params)}
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        for module in modules:
            for m in module.modules():
                mine = [index[id(p)] for p in m.parameters(recurse=False) if id(p) in index]
                if mine:
                    self.hooks.append(m.register_forward_pre_hook(self._record(mine)))

    def _record(self, indices: list[int]):
        def used(*_) -> None:
            if not self.buckets:
                self.used.update(dict.fromkeys(indices))

        return used

    def _lay_out(self) -> None:
        """Buckets in the reverse of the forward pass's order (tensors it never saw last), process 0's."""
        import torch.distributed as dist

        order = list(reversed(self.used)) + [i for i in reversed(range(len(self.params))) if i not in self.used]
        shared = torch.tensor(order, dtype=torch.int64, device=self.params[0].device)
        dist.broadcast(shared, src=0)
        order = shared.tolist()
        self.buckets = [[order[j] for j in b] for b in _buckets([self.params[i] for i in order], self.limit)]
        self.bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}
        self.ready, self.next = [0] * len(self.buckets), 0

    def _hook(self, index: int):
        def ready(_: torch.Tensor) -> None:
            if not self.buckets:
                self._lay_out()
            self.ready[self.bucket_of[index]] += 1
            while self.next < len(self.buckets) and self.ready[self.next] == len(self.buckets[self.next]):
                self._send(self.next)
                self.next += 1

        return ready

    def flush(self) -> None:
        """After a backward pass: send the buckets not sent yet (in order), then start over."""
        if not self.buckets:  # no gradient here at all this time: still take part in the layout
            self._lay_out()
        while self.next < len(self.buckets):
            self._send(self.next)
            self.next += 1
        self.ready, self.next = [0] * len(self.buckets), 0

    @torch.no_grad()
    def _send(self, b: int) -> None:
        import torch.distributed as dist

        members = self.buckets[b]
        held = sum(p.grad.numel() for p in self.params if p.grad is not None)
        self.peak = max(self.peak, held + sum(t.numel() for t in self.sums.values()))
        for rank in sorted({self.owner[i] for i in members}):
            mine = [i for i in members if self.owner[i] == rank]
            # one element per tensor after its values: 1 where this process had a gradient
            flat = torch.cat([
                torch.cat([g.reshape(-1), g.new_ones(1)]) if (g := self.params[i].grad) is not None
                else self.params[i].new_zeros(self.params[i].numel() + 1)
                for i in mine
            ])
            dist.reduce(flat, dst=rank)
            if rank == self.rank:
                offset, ends = 0, []
                for i in mine:
                    n = self.params[i].numel()
                    part = flat[offset : offset + n].view_as(self.params[i])
                    if i in self.sums:
                        self.sums[i] += part
                    else:
                        self.sums[i] = part.clone()
                    ends.append(offset + n)
                    offset += n + 1
                for i, had in zip(mine, (flat[ends] > 0).tolist(), strict=True):  # one device sync
                    self.seen[i] = self.seen.get(i, False) or had
            for i in mine:
                self.params[i].grad = None

    @torch.no_grad()
    def finish(self) -> None:
        """Once per optimizer step, after the last flush: each owned tensor gets its averaged gradient."""
        for i, total in self.sums.items():
            self.params[i].grad = total.div_(self.world) if self.seen[i] else None
        self.sums, self.seen = {}, {}

    def close(self) -> None:
        """Remove the hooks (after training: a later backward pass, e.g. a caller's, sends nothing)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def clip(self, bound: float) -> float:
        """Global gradient norm over every process's share (one all-reduce), and owned gradients scaled down
        to ``bound`` when above it; the same value on every process."""
        import torch.distributed as dist

        grads = [p.grad for p in self.params if p.grad is not None]
        device = grads[0].device if grads else self.params[0].device
        squares = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            squares += g.detach().double().pow(2).sum()
        dist.all_reduce(squares)
        norm = float(squares.sqrt())
        if math.isfinite(norm) and norm > bound:
            coef = bound / (norm + 1e-6)
            for g in grads:
                g.mul_(coef)
        return norm


def _buckets(tensors: Sequence[torch.Tensor], limit: int = GRADIENT_BUCKET) -> list[list[int]]:
    """Positions in ``tensors`` of consecutive runs of one dtype and device, at most ``limit`` elements each
    (a larger tensor alone)."""
    out: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        last = tensors[out[-1][0]] if out else None
        if last is None or size + t.numel() > limit or (t.dtype, t.device) != (last.dtype, last.device):
            out.append([i])
            size = t.numel()
        else:
            out[-1].append(i)
            size += t.numel()
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
            "MULTI_GPU, e.g. docs/accelerate/ddp.yaml) with optim.shard_states = true for ZeRO stage 1, "
            "optim.shard_gradients = true for ZeRO stage 2, train.shard_frozen = true to split the frozen UNet "
            "weights as FSDP would; the other settings: docs/distributed.md"
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
