"""torch.distributed glue: rank/world from torchrun's environment, and the few collectives used.

The engine is torch's own (DDP for gradients, all_reduce for metrics and attention sums);
with world size 1 every helper here is a no-op, so single-process code paths are unchanged.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..settings import SettingsError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; a CPU tensor (metrics, counts) under NCCL travels via this rank's GPU,
        as NCCL only reduces CUDA tensors."""
        if self.active:
            if t.device.type == "cpu" and dist.get_backend() == "nccl":
                on_gpu = t.to(f"cuda:{self.local_rank}")
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                t.copy_(on_gpu.cpu())
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


class CollectiveTimeout(TimeoutError):
    """A torch.distributed collective waited longer than dist_timeout for another rank (an OSError,
    so the CLI reports it as an error instead of a traceback)."""


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group torchrun (or the caller) set up through RANK/WORLD_SIZE/MASTER_*.

    NCCL on GPUs, gloo on CPUs; multi-node works through torchrun's rendezvous unchanged. A collective
    that waits `timeout_s` for another rank fails (gloo raises, NCCL's watchdog ends the process)
    instead of hanging the job until an outside limit."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("distributed=True needs torchrun (or RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)")
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    return DistContext(dist.get_rank(), dist.get_world_size(), local)


def collective_timeout(error: BaseException, timeout_s: float, hint: str) -> Optional[CollectiveTimeout]:
    """The CollectiveTimeout a torch.distributed error stands for (gloo: "Timed out waiting ...ms",
    the store: "timed out after ..."), else None. `hint` says where the run can continue from."""
    if not isinstance(error, RuntimeError) or not re.search(r"timed? ?out", str(error), re.IGNORECASE):
        return None
    first = str(error).strip().splitlines()[0]
    return CollectiveTimeout(f"a torch.distributed collective waited more than dist_timeout={timeout_s:g} s "
                             "(CLI: --dist-timeout) for another rank, which stalled or died; the job stops "
                             f"instead of hanging ({first}); {hint}")


def device_for(ctx: DistContext, device: str) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
    return _checked_device(device)


def _checked_device(device: str) -> torch.device:
    """torch.device(device), refusing names and GPUs this machine does not have up front: torch
    itself only fails later, at the first .to(device), with a message that does not name the setting."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SettingsError(f"device={device!r} is not a valid device; use 'auto', 'cpu', 'cuda' or 'cuda:N' "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"device={device!r}: no CUDA device is available on this machine "
                                "(torch.cuda.is_available() is False); use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                f"device(s), numbered from 0")
    return dev
