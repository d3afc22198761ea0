"""Communication for data-parallel K-FAC over ``torch.distributed``; the math never imports it.

Each rank computes K-FAC statistics and gradients on its own data. :class:`Communicator`
averages the new factor contributions across ranks (one flattened asynchronous all-reduce per
statistics update, waited for at the next ``step()``), assigns the eigendecompositions to ranks,
largest factors first to the least-loaded rank (greedy, as KAISA, Pauloski et al. 2021), and
broadcasts each result from its owner. :func:`allreduce_gradients` averages gradients. With equal
per-rank batches, the factors, gradients and so every update equal those of one process on the
concatenated batch.

Collectives run with the process group's timeout; a failure (another rank died or stalled)
raises :class:`DistributedError` naming the operation, instead of hanging.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


class DistributedError(RuntimeError):
    """A collective failed: usually another rank exited or stopped responding."""


class PendingAverage:
    """An in-flight all-reduce of a flattened buffer; ``wait()`` returns the averaged tensors."""

    def __init__(self, comm: Communicator, tensors: list[Tensor], flat: Tensor, work: Any) -> None:
        self._comm, self._tensors, self._flat, self._work = comm, tensors, flat, work

    def wait(self) -> list[Tensor]:
        if self._work is not None:
            self._comm._call("all_reduce", self._work.wait)
        self._flat.div_(self._comm.world_size)
        out, offset = [], 0
        for t in self._tensors:
            out.append(self._flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out


class Communicator:
    """Collectives of one process group (the default group unless ``group`` is given)."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised (see init_distributed)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def average_async(self, tensors: Sequence[Tensor]) -> PendingAverage:
        """Start averaging ``tensors`` (same dtype and device) across ranks; returns a handle."""
        tensors = list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        work = self._call(
            "all_reduce", lambda: dist.all_reduce(flat, group=self.group, async_op=True)
        )
        return PendingAverage(self, tensors, flat, work)

    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return self.average_async(tensors).wait()

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
        for t in tensors:
            self._call("broadcast", functools.partial(dist.broadcast, t, src, group=self.group))

    def assign(self, costs: Sequence[float]) -> list[int]:
        """Owner rank per task: largest first, each to the currently least-loaded rank."""
        load = [0.0] * self.world_size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            owner[i] = rank
            load[rank] += costs[i]
        return owner

    def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as err:
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {op} failed; another rank probably exited "
                f"or stalled past the timeout ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size})"


def allreduce_gradients(params: Iterable[Tensor], comm: Communicator | None) -> None:
    """Average ``.grad`` of ``params`` across ranks (one flattened all-reduce per dtype/device)."""
    if comm is None or comm.world_size == 1:
        return
    grads: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        if p.grad is None:  # every rank must send the same layout: missing grads count as 0
            p.grad = torch.zeros_like(p)
        grads.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for group in grads.values():
        averaged = comm.average(group)
        torch._foreach_copy_(group, averaged)


def average_scalar(value: float | Tensor, comm: Communicator | None) -> float:
    """Mean of a scalar over ranks (e.g. the measured KL that drives damping on every rank)."""
    if comm is None or comm.world_size == 1:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1)
    if dist.get_backend(comm.group) == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    return float(comm.average([t])[0])


def init_distributed(
    device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> Communicator | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); ``None`` otherwise.

    Backend: NCCL for CUDA devices, gloo otherwise. Returns the communicator of the default group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return Communicator()


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_after_failure(code: int) -> NoReturn:
    """Leave the process at once after a failed collective.

    The broken process group's background threads can turn the interpreter's normal shutdown
    into ``std::terminate`` (SIGABRT); output is flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
