"""Training speed of every shipped config with torch's thread count fixed or chosen by the policy.

For each config, ``scripts/train.py`` runs a few updates with ``--threads 1``, ``--threads N``
(every usable core) and the automatic choice (:func:`rl_kfac.threads.auto_threads`), on an idle
machine and again while one other process keeps a core busy; agent steps per second come from
each run's ``result.json`` (best of two runs). The policy's goal: never more than 1.5x slower
than the best fixed count.

    python scripts/bench_threads.py [--configs configs/acktr/pong.yaml,...] [--no-busy]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps_per_second(config: Path, threads: int | None, budget: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            "--config",
            str(config),
            "--total-timesteps",
            str(budget),
            "--log-dir",
            f"{tmp}/run",
            "--no-progress",
        ]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        subprocess.run(cmd, check=True, capture_output=True, env=_env())
        result = json.loads((Path(tmp) / "run" / "result.json").read_text())
    return result["timesteps"] / result["wall_time_s"], result["threads"]


def best_of_two(config: Path, threads: int | None, budget: int) -> tuple[float, int]:
    return max(steps_per_second(config, threads, budget) for _ in range(2))


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the policy and --threads decide
    return env


def main() -> None:
    import yaml

    from rl_kfac.threads import usable_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", help="comma-separated (default: configs/*/*.yaml)")
    parser.add_argument("--no-busy", action="store_true", help="idle machine only")
    args = parser.parse_args()
    configs = (
        [(ROOT / c).resolve() for c in args.configs.split(",")]
        if args.configs
        else sorted(ROOT.glob("configs/[!z]*/*.yaml"))
    )
    cores = usable_cores()
    print(
        f"{'config':34s} {'load':5s} {'1 thr':>7s} {f'{cores} thr':>7s} {'auto':>7s} "
        f"{'auto=':>5s} {'best/auto':>9s}"
    )
    for busy in [False] if args.no_busy else [False, True]:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for config in configs:
                cfg = yaml.safe_load(config.read_text())
                batch = cfg.get("n_envs", 16) * cfg.get("n_steps", 20)
                updates = 6 if cfg.get("arch") == "cnn" else max(3, -(-20000 // batch))

                budget = batch * updates
                rates = {t: best_of_two(config, t, budget)[0] for t in (1, cores)}
                auto, chosen = best_of_two(config, None, budget)
                name = str(config.relative_to(ROOT))
                print(
                    f"{name:34s} {'busy' if busy else 'idle':5s} {rates[1]:7.0f} "
                    f"{rates[cores]:7.0f} {auto:7.0f} {chosen:5d} "
                    f"{max(rates.values()) / auto:9.2f}",
                    flush=True,
                )
        finally:
            if spinner is not None:
                spinner.kill()


if __name__ == "__main__":
    main()
