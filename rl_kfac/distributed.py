"""Everything distributed about data-parallel K-FAC; the math modules only see a communicator.

Each rank computes K-FAC statistics and gradients on its own data. A :class:`Communicator`
averages the new factor contributions across ranks (one flattened asynchronous all-reduce per
statistics update, waited for at the next ``step()``); :func:`shared_eigendecompositions` assigns
the eigendecompositions to ranks (:func:`assign_owners`: largest factors first, each to the
least-loaded rank, greedy as in KAISA, Pauloski et al. 2021) and broadcasts each result from its
owner. :func:`allreduce_gradients` averages gradients. With equal per-rank batches, the factors,
gradients and so every update equal those of one process on the concatenated batch.

:class:`Communicator` is a protocol: :class:`TorchCommunicator` implements it over a
``torch.distributed`` process group; tests and other back-ends bring their own.

Collectives run with the process group's timeout; a failure (another rank died or stalled)
raises :class:`DistributedError` naming the operation, instead of hanging.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


class DistributedError(RuntimeError):
    """A collective failed: usually another rank exited or stopped responding."""


class PendingAverage(Protocol):
    """An average in flight; ``wait()`` returns the averaged tensors, in the order given."""

    def wait(self) -> list[Tensor]: ...


class Communicator(Protocol):
    """The collectives data-parallel K-FAC needs."""

    rank: int
    world_size: int
    device: torch.device  # where tensors sent through it must live

    def average_async(self, tensors: Sequence[Tensor]) -> PendingAverage:
        """Start averaging ``tensors`` (same dtype and device) across ranks."""
        ...

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
        ...


class _FlatAverage:
    """An in-flight all-reduce of a flattened buffer."""

    def __init__(
        self, comm: TorchCommunicator, tensors: list[Tensor], flat: Tensor, work: Any
    ) -> None:
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


class TorchCommunicator:
    """:class:`Communicator` over a ``torch.distributed`` process group (default: the world)."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised (see init_distributed)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    def average_async(self, tensors: Sequence[Tensor]) -> PendingAverage:
        tensors = list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        work = self._call(
            "all_reduce", lambda: dist.all_reduce(flat, group=self.group, async_op=True)
        )
        return _FlatAverage(self, tensors, flat, work)

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> None:
        for t in tensors:
            self._call("broadcast", functools.partial(dist.broadcast, t, src, group=self.group))

    def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as err:
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {op} failed; another rank probably exited "
                f"or stalled past the timeout ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err

    def __repr__(self) -> str:
        return f"TorchCommunicator(rank={self.rank}, world_size={self.world_size})"


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank per task: largest first, each to the currently least-loaded rank."""
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


Eigen = tuple[Tensor, Tensor]  # eigenvalues, eigenvectors


def shared_eigendecompositions(
    comm: Communicator, factors: list[Tensor], decompose: Callable[[Tensor], Eigen | None]
) -> list[Eigen | None]:
    """``decompose`` of every factor, each computed by one rank and broadcast to all.

    Owners by cost ``n³`` (:func:`assign_owners`); a failed decomposition (``None``) is ``None``
    on every rank.
    """
    owners = assign_owners([float(f.shape[0]) ** 3 for f in factors], comm.world_size)
    return [
        _broadcast_eig(comm, decompose(f) if owner == comm.rank else None, f, owner)
        for f, owner in zip(factors, owners)
    ]


def _broadcast_eig(
    comm: Communicator, eig: Eigen | None, factor: Tensor, owner: int
) -> Eigen | None:
    """The owner's eigendecomposition of ``factor`` on every rank (``None`` if it failed)."""
    ok = torch.tensor([float(eig is not None)], device=factor.device)
    comm.broadcast([ok], owner)
    if not bool(ok):
        return None
    if eig is None:
        n = factor.shape[0]
        eig = (factor.new_empty(n), factor.new_empty(n, n))
    else:  # eigh returns column-major eigenvectors; collectives send raw storage
        eig = (eig[0].contiguous(), eig[1].contiguous())
    comm.broadcast(list(eig), owner)
    return eig


def average(tensors: Sequence[Tensor], comm: Communicator) -> list[Tensor]:
    """``tensors`` averaged across ranks (blocking)."""
    return comm.average_async(tensors).wait()


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
        averaged = average(group, comm)
        torch._foreach_copy_(group, averaged)


def average_scalar(value: float | Tensor, comm: Communicator | None) -> float:
    """Mean of a scalar over ranks (e.g. the measured KL that drives damping on every rank)."""
    if comm is None or comm.world_size == 1:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=comm.device).reshape(1)
    return float(average([t], comm)[0])


def init_distributed(
    device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> TorchCommunicator | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); ``None`` otherwise.

    Backend: NCCL for CUDA devices, gloo otherwise. Returns the communicator of the default group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return TorchCommunicator()


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
