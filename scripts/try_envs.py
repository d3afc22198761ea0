"""Every environment in Gymnasium's own registry through a short ``scripts/train.py`` run.

For each id: ``configs/acktr/cartpole.yaml`` with the id (so ACKTR's settings, the network
picked for the id's spaces), ``--total-timesteps`` steps (2 envs x 16
steps per update), a checkpoint halfway; passed = exit 0 with TensorBoard events and
``last.pt`` written. Ids whose environment cannot be made on this installation (mujoco-py's
v2/v3, jax's functional ones, the shimmy compatibility wrappers) are listed as skipped with
the reason our CLI gave.

    python scripts/try_envs.py [--steps 2048] [--only CartPole-v1,FrozenLake-v1]

Writes ``bench_results/envs/registry.csv`` (id, spaces, outcome, the one-line message, the
commit).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym

from agents.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_results/envs/registry.csv"
CONFIG = ROOT / "configs/acktr/cartpole.yaml"


def spaces_of(env_id: str) -> str:
    try:
        env = gym.make(env_id)
    except Exception as err:  # any failure is reported, not raised
        return f"cannot make: {type(err).__name__}"
    text = f"{env.observation_space} -> {env.action_space}"
    env.close()
    return " ".join(text.split())  # Box bounds print over several lines


def try_one(env_id: str, steps: int, timeout: float) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", str(CONFIG)]
        cmd += ["--set", f"env_id={env_id}"]
        cmd += ["--set", "n_envs=2", "--set", "n_steps=16", "--set", "log_interval=1"]
        cmd += ["--set", f"checkpoint_interval={steps // 2}", "--total-timesteps", str(steps)]
        cmd += ["--log-dir", str(run), "--no-progress"]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"outcome": "failed", "message": f"no exit within {timeout:.0f} s"}
        wall = f"{time.perf_counter() - start:.1f}"
        written = (run / "last.pt").exists() and any(run.glob("events.out.tfevents.*"))
        lines = done.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        if done.returncode == 0 and written:
            return {"outcome": "passed", "message": "", "wall_s": wall}
        if done.returncode == 2 and len([x for x in lines if x.startswith("error:")]) == 1:
            return {"outcome": "skipped", "message": last, "wall_s": wall}  # one-line refusal
        return {"outcome": "failed", "message": f"exit {done.returncode}: {last}", "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--only", help="comma-separated ids (default: the whole registry)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ids = args.only.split(",") if args.only else sorted(gym.registry)
    rows = []
    for env_id in ids:
        row = {
            "env_id": env_id,
            "spaces": spaces_of(env_id),
            **try_one(env_id, args.steps, args.timeout),
        }
        rows.append(row)
        print(f"{row['outcome']:8s} {env_id:40s} {row['message']}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    commit = provenance()["commit"]
    with open(OUT, "w", newline="") as f:
        columns = ["env_id", "outcome", "spaces", "wall_s", "message", "commit"]
        table = csv.DictWriter(f, fieldnames=columns, restval=commit)
        table.writeheader()
        table.writerows(rows)
    count = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "skipped", "failed")}
    print(f"{len(rows)} tried: {count}; wrote {OUT}")


if __name__ == "__main__":
    main()
