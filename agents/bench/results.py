"""A suite's committed results: ``runs.csv`` (one row per finished run), ``episodes.csv`` (every
finished episode of every run) and one curve plot per environment.

Rows are appended as runs finish, so an interrupted suite keeps what it finished; a run
repeated with ``--rerun`` replaces its earlier row and episodes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from agents.bench.suites import NAMES

RUN_COLUMNS = [
    "algo",
    "env",
    "seed",
    "timesteps",
    "first_to_threshold",
    "final_last100",
    "best_last100",
    "low_after_threshold",
    "episodes",
    "wall_s",
    "update_share",
    *(PROVENANCE := ("threads", "device", "commit", "torch", "gymnasium", "sb3")),
]
EPISODE_COLUMNS = ["algo", "env", "seed", "timestep", "return"]
Key = tuple[str, str, int, int]  # algo, env, seed, timesteps


def last100_means(returns: list[float]) -> list[float]:
    """The mean of each window of 100 consecutive episodes."""
    sums = np.cumsum([0.0, *returns])
    return [float(sums[i] - sums[i - 100]) / 100 for i in range(100, len(returns) + 1)]


def first_to_threshold(episodes: list[tuple[int, float]], threshold: float) -> int | None:
    """The step of the episode with which the last-100 mean first reached ``threshold``."""
    means = last100_means([r for _, r in episodes])
    return next((episodes[i + 99][0] for i, m in enumerate(means) if m >= threshold), None)


def low_after_threshold(episodes: list[tuple[int, float]], threshold: float) -> float | None:
    """The lowest last-100 mean after it first reached ``threshold`` (a late collapse shows
    here); ``None`` if it never did."""
    means = last100_means([r for _, r in episodes])
    first = next((i for i, m in enumerate(means) if m >= threshold), None)
    return None if first is None else round(min(means[first:]), 1)


def run_row(
    key: Key, episodes: list[tuple[int, float]], threshold: float, summary: dict[str, Any]
) -> dict[str, Any]:
    """One ``runs.csv`` row from a run's episodes and its ``result.json``."""
    algo, env, seed, timesteps = key
    returns = [r for _, r in episodes]
    means = last100_means(returns)
    wall = float(summary.get("wall_time_total_s", summary.get("wall_time_s", 0.0)))
    update = summary.get("update_time_s")
    part = float(summary.get("wall_time_s", wall))
    return {
        "algo": algo,
        "env": env,
        "seed": seed,
        "timesteps": timesteps,
        "first_to_threshold": first_to_threshold(episodes, threshold),
        "final_last100": round(float(np.mean(returns[-100:])), 1) if returns else None,
        "best_last100": round(max(means), 1) if means else None,
        "low_after_threshold": low_after_threshold(episodes, threshold),
        "episodes": len(episodes),
        "wall_s": round(wall, 1),
        # our trainer's update time covers the part of a resumed run since its last resume
        "update_share": None if update is None else round(update / part, 3) if part else None,
        **{k: summary.get(k, "unknown") for k in PROVENANCE},
    }


class SuiteResults:
    """``<root>/<suite>/runs.csv`` and ``episodes.csv``."""

    def __init__(self, root: Path, suite: str) -> None:
        self.dir = root / suite
        self.runs_path = self.dir / "runs.csv"
        self.episodes_path = self.dir / "episodes.csv"

    def __repr__(self) -> str:
        return f"SuiteResults({str(self.dir)!r})"

    def rows(self) -> list[dict[str, str]]:
        if not self.runs_path.exists():
            return []
        with open(self.runs_path, newline="") as f:
            return list(csv.DictReader(f))

    def finished(self) -> set[Key]:
        return {_key(r) for r in self.rows()}

    def episodes(self) -> list[tuple[str, str, int, int, float]]:
        if not self.episodes_path.exists():
            return []
        with open(self.episodes_path, newline="") as f:
            return [(a, e, int(s), int(t), float(x)) for a, e, s, t, x in list(csv.reader(f))[1:]]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the suite's lock file: two benchmark commands on one suite (two sittings, or
        reference and ours side by side) then cannot interleave a rewrite and an append and lose
        a row. An advisory ``flock``; where there is none (Windows) nothing is locked."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def add(self, row: dict[str, Any], episodes: list[tuple[int, float]]) -> None:
        """Append a finished run (replacing an earlier row and episodes with its key)."""
        with self.locked():
            key = _key(row)
            new_eps = [(row["algo"], row["env"], row["seed"], s, f"{r:.6g}") for s, r in episodes]
            rows = self.rows()
            if any(_key(r) == key for r in rows):
                rows = [r for r in rows if _key(r) != key]
                ident = key[:3]
                kept = [e for e in self.episodes() if (e[0], e[1], e[2]) != ident]
                self._write(self.runs_path, RUN_COLUMNS, [[r.get(c, "") for c in RUN_COLUMNS]
                                                           for r in rows])  # fmt: skip
                self._write(self.episodes_path, EPISODE_COLUMNS, [list(e) for e in kept])
            self._append(self.runs_path, RUN_COLUMNS, [[_cell(row.get(c)) for c in RUN_COLUMNS]])
            self._append(self.episodes_path, EPISODE_COLUMNS, [list(e) for e in new_eps])

    @staticmethod
    def _write(path: Path, header: list[str], rows: list[list[Any]]) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        tmp.replace(path)

    @staticmethod
    def _append(path: Path, header: list[str], rows: list[list[Any]]) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(header)
            writer.writerows(rows)

    def plot(self, env: str, threshold: float) -> Path:
        """``<env>.png``: the last-100 mean of every run of ``env`` against its steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        runs: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for algo, e, seed, step, ret in self.episodes():
            if e == env:
                runs.setdefault((algo, seed), []).append((step, ret))
        fig, ax = plt.subplots(figsize=(7, 4))
        labelled: set[str] = set()
        for (algo, _), eps in sorted(runs.items()):
            rets = np.array([x for _, x in eps])
            smooth = [rets[max(0, i - 99) : i + 1].mean() for i in range(len(rets))]
            label = None if algo in labelled else NAMES.get(algo, algo)
            labelled.add(algo)
            color = COLORS.get(algo, "gray")
            ax.plot([s for s, _ in eps], smooth, color=color, alpha=0.6, lw=1, label=label)
        ax.axhline(threshold, color="k", ls="--", lw=0.8)
        ax.set(xlabel="timesteps", ylabel="mean return, last 100 episodes", title=env)
        if labelled:
            ax.legend()
        fig.tight_layout()
        path = self.dir / f"{env.replace('/', '-')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


COLORS = {
    "acktr": "tab:red",
    "a2c": "tab:blue",
    "ppo_kfac": "tab:orange",
    "ppo": "tab:green",
    "sb3_acktr": "tab:purple",
    "sb3_ppo_kfac": "tab:brown",
    "recurrent_ppo": "tab:cyan",
}


def _key(row: dict[str, Any]) -> Key:
    return (str(row["algo"]), str(row["env"]), int(row["seed"]), int(row["timesteps"]))


def _cell(value: Any) -> Any:
    return "" if value is None else value
