"""``episodes.csv`` of a run: every finished episode as it happens, kept across resumes."""

from __future__ import annotations

import csv
from pathlib import Path

HEADER = ["timestep", "return", "length"]


class EpisodeLog:
    """Appends ``(timestep, return, length)`` rows to ``path``.

    A run resumed from a checkpoint at ``resume_from`` steps first drops the rows an interrupted
    run wrote after that checkpoint, so every episode appears once, in order.
    """

    def __init__(self, path: Path, resume_from: int = 0) -> None:
        self.path = path
        kept: list[list[str]] = []
        if resume_from and path.exists():
            with open(path, newline="") as f:
                kept = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= resume_from]
        self._file = open(path, "w", newline="")  # noqa: SIM115 (open for the run)
        self._writer = csv.writer(self._file)
        self._writer.writerows([HEADER, *kept])
        self._file.flush()

    def append(self, episodes: list[tuple[int, float, int]]) -> None:
        self._writer.writerows((step, f"{ret:.6g}", length) for step, ret, length in episodes)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"EpisodeLog({str(self.path)!r})"


def read_episodes(path: Path) -> list[tuple[int, float, int]]:
    """The rows of an ``episodes.csv``."""
    with open(path, newline="") as f:
        return [(int(s), float(r), int(n)) for s, r, n in list(csv.reader(f))[1:]]
