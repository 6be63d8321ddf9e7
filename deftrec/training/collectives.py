"""The few collectives the training loop needs, each a no-op on one rank, and its memory probe."""

from __future__ import annotations

import resource

import torch


def all_ranks(flag: bool, device: torch.device, world: int) -> bool:
    """Whether ``flag`` holds on every rank (all-reduced MIN)."""
    import torch.distributed as tdist

    v = torch.tensor([1 if flag else 0], device=device)
    if world > 1:
        tdist.all_reduce(v, op=tdist.ReduceOp.MIN)
    return bool(v.item())


def mean_over_ranks(values: list[float], device: torch.device, world: int) -> list[float]:
    import torch.distributed as tdist

    v = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        tdist.all_reduce(v)
        v /= world
    return v.tolist()


def max_over_ranks(value: float, device: torch.device, world: int) -> float:
    import torch.distributed as tdist

    v = torch.tensor([value], dtype=torch.float64, device=device)
    if world > 1:
        tdist.all_reduce(v, op=tdist.ReduceOp.MAX)
    return float(v.item())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
