"""Do ``rl_kfac.sb3.ACKTR``, ``PPOKFAC`` and ``RecurrentPPOKFAC`` learn with no hyperparameters
given? And SB3's A2C / PPO (sb3-contrib's RecurrentPPO) with theirs, beside them.

Each run is what a user writes first, e.g. ``PPOKFAC("MlpPolicy", "CartPole-v1",
seed=S).learn(100_000)``, evaluated deterministically (10 episodes) every ``--eval-every`` steps
(``agents.bench.defaults``). Runs already in ``bench_results/sb3_defaults/runs.csv`` are skipped
(``--rerun`` repeats them); each finished run is written at once, so an interrupted command
continues where it stopped when given again. One-thread runs go two at a time, two-thread runs
one at a time (this project's machine has two cores).

    python scripts/bench_sb3_defaults.py --envs CartPole-v1 --algos acktr,ppo_kfac --seeds 0-4
    python scripts/bench_sb3_defaults.py --envs Acrobot-v1 --algos a2c,ppo --threads 1
    python scripts/bench_sb3_defaults.py --report     # the README table from runs.csv
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

from agents.bench.defaults import (
    MARKERS,
    OURS,
    REFERENCES,
    RESULTS,
    TASKS,
    DefaultsRun,
    read,
    render,
    save,
    train,
)
from agents.bench.report import replace_block

README = Path("README.md")


def _seeds(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    if not key.isidentifier():
        raise ValueError(text)
    return key, ast.literal_eval(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", default="CartPole-v1", help=f"comma-separated: {list(TASKS)}")
    parser.add_argument("--algos", default="acktr,ppo_kfac,recurrent_ppo_kfac")
    parser.add_argument("--seeds", default="0-4", help="FIRST-LAST")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--rerun", action="store_true", help="repeat runs already recorded")
    parser.add_argument("--report", action="store_true", help="write the README table only")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a candidate's argument (a Python literal), e.g. kl_guard=1.0; needs --out",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the runs.csv to add to")
    args = parser.parse_args(argv)
    if args.report:
        README.write_text(replace_block(README.read_text(), MARKERS, render(read())))
        print(f"wrote the table in {README}")
        return 0
    envs, algos = args.envs.split(","), args.algos.split(",")
    bad = [e for e in envs if e not in TASKS] + [a for a in algos if a not in OURS + REFERENCES]
    try:
        seeds, threads = _seeds(args.seeds), [int(t) for t in args.threads.split(",")]
    except ValueError:
        bad.append(f"--seeds {args.seeds} / --threads {args.threads}")
    try:
        settings = tuple(_setting(s) for s in args.set)
    except (ValueError, SyntaxError):
        bad.append(f"--set {args.set}")
        settings = ()
    if settings and args.out == RESULTS:
        bad.append("--set without --out (the defaults' table holds the defaults only)")
    if bad or args.eval_every < 1:
        print(f"error: unknown or invalid {bad or ['--eval-every']}", file=sys.stderr)
        return 2
    done = {(r["algo"], r["env"], r["seed"], r["threads"]) for r in read(args.out)}
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers set torch's count themselves
    for count in threads:
        jobs = [
            DefaultsRun(a, e, s, count, args.eval_every, settings)
            for e in envs
            for a in algos
            for s in seeds
        ]
        jobs = [j for j in jobs if args.rerun or j.key not in done]
        with mp.get_context("spawn").Pool(2 if count == 1 else 1) as pool:
            for row in pool.imap_unordered(train, jobs):
                save(row, args.out)
                print(
                    f"{row['algo']} {row['env_id']} seed {row['seed']} threads {count}: first "
                    f"{row['first_reach']}, lowest after {row['lowest_after']}, final "
                    f"{row['final_eval']}, rejected {row['rejected_steps']}, {row['wall_s']} s",
                    flush=True,
                )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
