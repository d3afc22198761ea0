"""How many intra-op threads torch should use for a training process.

On a few cores, torch's default (one thread per core) makes small networks slower: their
kernels are too short to split, and OpenMP threads spin while waiting. A core taken by another
process makes it far worse: the spinning threads then contend with it (measured on this
project's 2-core machine: 3200 CartPole steps in 26.5 s instead of 0.3 s). Large networks
(convolutions on images: few parameters, many multiply-adds) do gain from threads, as long as
the cores are free.

:func:`auto_threads` therefore gives small networks one thread and large ones as many threads as
there are idle cores when it is asked (measured from ``/proc/stat`` over a fraction of a second
on Linux; all usable cores elsewhere).
"""

from __future__ import annotations

import os
import time

from torch import nn

SMALL_NETWORK = 1_000_000  # parameters; MLP policies have ~10k


def usable_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores(seconds: float = 0.25) -> float:
    """Cores left idle by every process on the machine over ``seconds`` (Linux), else all."""

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields[:8])  # guest time is already counted in user time

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[1] == first[1]:
        return float(usable_cores())
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def auto_threads(model: nn.Module, idle: float | None = None, processes: int = 1) -> int:
    """One thread for a small network (no convolutions, under a million parameters); for a
    large one, the usable cores idle now (``idle``:
    measured earlier, e.g. before starting environment processes), shared by ``processes``
    training processes on this machine (torchrun's local world size)."""
    params = sum(p.numel() for p in model.parameters())
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if params < SMALL_NETWORK and not convolutional:
        return 1
    free = min(float(usable_cores()), idle_cores() if idle is None else idle)
    return max(1, round(free) // max(processes, 1))
