"""Do ``rl_kfac.sb3.ACKTR`` and ``PPOKFAC`` learn with no hyperparameters given?

Each run is exactly what a user writes first, ``ACKTR("MlpPolicy", "CartPole-v1",
seed=S).learn(100_000)`` (SB3 makes one environment from the id), with the torch thread count
set first. Every ``--eval-every`` steps the deterministic policy plays ``--eval-episodes``
episodes of a separate environment (SB3's ``evaluate_policy``). Metric: the first evaluation
whose mean return reaches 475, and the evaluations after it. One-thread runs go two at a time,
two-thread runs one at a time (this project's machine has two cores).

    python scripts/bench_sb3_defaults.py [--seeds 5] [--threads 1,2] [--algos acktr,ppo_kfac]

Appends to ``bench_results/sb3_defaults/runs.csv`` (one row per run; a re-run replaces the
rows of the same algorithm, seed and thread count).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from agents.provenance import provenance

ENV = "CartPole-v1"
THRESHOLD = 475.0
OUT = Path("bench_results/sb3_defaults/runs.csv")


def run(args: tuple[str, int, int, int, int, int]) -> dict[str, Any]:
    algo, seed, threads, steps, every, episodes = args
    import gymnasium as gym
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    from rl_kfac.sb3 import ACKTR, PPOKFAC

    torch.set_num_threads(threads)
    evals: list[tuple[int, float]] = []

    class Evaluate(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.env = gym.make(ENV)
            self.env.reset(seed=10_000 + seed)  # never one of the training env's seeds

        def _on_step(self) -> bool:
            if self.num_timesteps % every == 0:
                mean, _ = evaluate_policy(self.model, self.env, n_eval_episodes=episodes)
                evals.append((self.num_timesteps, float(mean)))  # type: ignore[arg-type]
            return True

    cls = {"acktr": ACKTR, "ppo_kfac": PPOKFAC}[algo]
    model = cls("MlpPolicy", ENV, seed=seed)  # nothing else: the defaults are what is tested
    start = time.perf_counter()
    model.learn(steps, callback=Evaluate())
    wall = time.perf_counter() - start
    first = next((t for t, m in evals if m >= THRESHOLD), None)
    after = [m for t, m in evals if first is not None and t >= first]
    return {
        "algo": algo,
        "seed": seed,
        "threads": threads,
        "timesteps": steps,
        "first_eval_475": first,
        "lowest_eval_after": None if first is None else round(min(after), 1),
        "final_eval": round(evals[-1][1], 1) if evals else None,
        "evals": " ".join(f"{t}:{m:.0f}" for t, m in evals),
        "wall_s": round(wall, 1),
    }


def save(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    made_by = provenance()
    new = {(r["algo"], str(r["seed"]), str(r["threads"])) for r in rows}
    old: list[dict[str, Any]] = []
    if path.exists():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if (r["algo"], r["seed"], r["threads"]) not in new]
    merged = old + [{**r, **made_by} for r in rows]
    merged.sort(key=lambda r: (r["algo"], int(r["threads"]), int(r["seed"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in merged for k in r)))
        table.writeheader()
        table.writerows(merged)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--algos", default="acktr,ppo_kfac")
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers set torch's count themselves
    rows = []
    for threads in map(int, args.threads.split(",")):
        jobs = [
            (a, s, threads, args.timesteps, args.eval_every, args.eval_episodes)
            for a in args.algos.split(",")
            for s in range(args.seeds)
        ]
        with mp.get_context("spawn").Pool(2 if threads == 1 else 1) as pool:
            rows += pool.map(run, jobs)
    save(rows, OUT)
    print(f"{ENV}, defaults, evaluation every {args.eval_every} steps, threshold {THRESHOLD}")
    for r in rows:
        print(
            f"{r['algo']:9s} seed {r['seed']} threads {r['threads']}: first >= 475 at "
            f"{r['first_eval_475']}, lowest after {r['lowest_eval_after']}, "
            f"final {r['final_eval']}, {r['wall_s']} s"
        )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
