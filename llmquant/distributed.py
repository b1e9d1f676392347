"""Calibration spread over several processes with ``torch.distributed`` (data parallel).

Launched with ``torchrun --nproc-per-node N -m llmquant run recipe.yaml`` (or ``accelerate launch``), every
process streams the same decoder layer and runs its own contiguous share of the calibration windows through it.
The statistics each quantization decision needs are summed over the processes (``H = XᵀX``, mean ``|x|``, token
counts; the maximum of ``|x|``; AWQ's token sample gathered in window order), so every process holds what one
process would have measured on all windows, up to float summation order. Each decision (an AWQ scale search, a
GPTQ solve) is then made by one process, in turn, and sent to the others, which install the same weights. Process
0 writes the work folder, the checkpoint and the check; the others only calibrate. CPU processes talk over
``gloo``, GPUs over ``nccl``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from .errors import PeerError, UserError


def launched() -> bool:
    """Whether this process was started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


# How long a process waits in a collective for the others: a long layer on one process (a big GPTQ solve) must not
# time the others out. Work that only one process does (evaluation, writing, checking) is never done while the
# others wait in a collective: it comes after stop().
TIMEOUT = timedelta(hours=2)


def start(device: torch.device) -> torch.device:
    """Join the process group of a launched run; return this process's compute device."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this PyTorch has no torch.distributed; run llmquant as one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(n: int) -> slice:
    """This process's contiguous share of ``n`` calibration windows (the first processes take one more)."""
    r, w = rank(), world_size()
    if n < w:
        raise UserError(f"calibration.nsamples {n} is fewer than the {w} processes; give each at least one window")
    base, extra = divmod(n, w)
    begin = r * base + min(r, extra)
    return slice(begin, begin + base + (1 if r < extra else 0))


@contextmanager
def _collective():
    """One line instead of the backend's message when the others never come: which process waited, and why that is."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(f"process {rank()} of {world_size()} waited for the others in a collective and it failed "
                        f"({first[:200]}): another process stopped (its own output says why) or was still working after "
                        f"the process group's timeout ({TIMEOUT})") from e


def barrier() -> None:
    import torch.distributed as dist

    if active():
        with _collective():
            dist.barrier()


def sum_(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if active():
        with _collective():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if active():
        with _collective():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def min_int(v: int) -> int:
    import torch.distributed as dist

    if not active():
        return v
    t = torch.tensor([v], dtype=torch.int64, device=_collective_device())
    with _collective():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather(obj) -> list:
    """Every process's ``obj``, in process order."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out = [None] * world_size()
    with _collective():
        dist.all_gather_object(out, obj)
    return out


def from_rank(obj, owner: int):
    """``obj`` as process ``owner`` has it (tensors travel on the CPU)."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [_to_cpu(obj) if rank() == owner else None]
    with _collective():
        dist.broadcast_object_list(box, src=owner)
    return box[0]


def _to_cpu(obj):
    from dataclasses import fields, is_dataclass, replace

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in fields(obj) if f.init})
    return obj


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
