"""``episodes.csv`` of a run: every finished episode as it happens, kept across resumes."""

from __future__ import annotations

import csv
from pathlib import Path

HEADER = ["timestep", "return", "length"]


class EpisodeLog:
    """Appends ``(timestep, return, length)`` rows to ``path``.

    A run resumed from a checkpoint at ``resume_from`` steps first drops the rows an interrupted
    run wrote after that checkpoint (and a row a crash cut short), so every episode appears
    once, in order. Rows are flushed as they are appended (once per update).
    """

    def __init__(self, path: Path, resume_from: int = 0) -> None:
        self.path = path
        kept: list[list[str]] = []
        if resume_from and path.exists():
            with open(path, newline="") as f:
                kept = [r for r in list(csv.reader(f))[1:] if _row(r, resume_from)]
        self._file = open(path, "w", newline="")  # noqa: SIM115 (open for the run)
        self._writer = csv.writer(self._file)
        self._writer.writerows([HEADER, *kept])
        self._file.flush()

    def append(self, episodes: list[tuple[int, float, int]]) -> None:
        self._writer.writerows((step, f"{ret:.6g}", length) for step, ret, length in episodes)
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"EpisodeLog({str(self.path)!r})"


def _row(row: list[str], until: int) -> bool:
    """Whether ``row`` is a whole row of a step up to ``until``."""
    try:
        step, _, _ = int(row[0]), float(row[1]), int(row[2])
    except (ValueError, IndexError):
        return False
    return len(row) == 3 and step <= until


def read_episodes(path: Path) -> list[tuple[int, float, int]]:
    """The rows of an ``episodes.csv``."""
    with open(path, newline="") as f:
        return [(int(s), float(r), int(n)) for s, r, n in list(csv.reader(f))[1:]]
