"""Training on several processes (`torchrun`): the process group, gathering rows with gradients, and who
writes.

`torchrun --nproc_per_node N -m miners.train_rogle ...` (and `--nnodes M --rdzv-endpoint HOST:PORT` for several
machines) starts N processes with RANK, WORLD_SIZE and LOCAL_RANK in their environment; `init_from_env`
joins them into one process group (NCCL on CUDA, gloo on CPUs), each on its own GPU (cuda:LOCAL_RANK).

Why gathering with gradients: a contrastive loss ranks each caption against the other images of the batch;
computed per process it would see only that process's share as negatives. `gather_rows` concatenates every
process's rows in rank order — the same order one process would have — and its backward hands each
process the gradient of its own rows, summed over the processes' (identical) losses. With
DistributedDataParallel averaging the parameter gradients, a step on N processes x B/N rows is the step of
one process on B rows (tests/miners/training/test_distributed.py checks it to 1e-5).

Consumes nothing but the environment torchrun sets; produces a `DistInfo` (or None for one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Collectives wait this long for a slow process (rank 0 evaluating or saving while the others wait at a
# barrier) before failing; a process that died makes torchrun end the others well before
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> DistInfo | None:
    """Join the process group torchrun described (None when this is one process). `device` "cpu" forces
    gloo even where CUDA exists; otherwise each process takes cuda:LOCAL_RANK when there is CUDA."""
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def process_device(info: DistInfo | None, device: str) -> str:
    """The device this process trains on: cuda:LOCAL_RANK under torchrun with CUDA, else `device`."""
    if info is not None and info.backend == "nccl":
        return f"cuda:{info.local_rank}"
    if info is not None:
        return "cpu"
    return device


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `x` (any first-dimension size, possibly 0 or different per process)
    concatenated in rank order; floating tensors keep their gradients (each process receives the gradient
    of its own rows). One process: `x` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_list = [int(s.item()) for s in sizes]
    longest = max(sizes_list)
    if longest == 0:
        return x
    padded = x
    if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then cut each process's rows back out
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad])
    if x.is_floating_point() and torch.is_grad_enabled():
        if not padded.requires_grad:  # e.g. no local pairs here: still take part in the backward's exchange
            padded = padded.detach().requires_grad_(True)
        stacked = _GatherWithGrad.apply(padded.contiguous())
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        stacked = torch.stack(parts)
    return torch.cat([stacked[r, :s] for r, s in enumerate(sizes_list)])


class _GatherWithGrad(torch.autograd.Function):
    """world x n x ... from every process's n x ... tensor. Backward: every process computed the same loss
    from the gathered rows, so the gradient of this process's rows is the sum over processes of the
    gradient each computed for them (an all-reduce, then this process's slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def any_process(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any process (a signal one process received stops them all together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
