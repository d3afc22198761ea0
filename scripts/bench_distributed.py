"""Throughput of the training script on 1 vs N processes (torchrun, gloo on CPU / NCCL on GPU).

Each configuration runs ``torchrun --nproc_per_node=P scripts/train.py`` with the same global
budget and reports environment steps per second of the training loop (from the run's
``result.json``, so process start-up is excluded) and the wall time of the whole command.

    python scripts/bench_distributed.py --config configs/acktr/lunarlander.yaml --procs 1,2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agents.cli import add_override_argument

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/acktr/lunarlander.yaml")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--timesteps", type=int, default=200_000)
    add_override_argument(parser, "override a config key (repeatable)")
    args = parser.parse_args()
    print(f"{args.config}, {args.timesteps} steps in total")
    print(f"{'procs':>5s} {'steps/s':>9s} {'speed-up':>9s} {'loop s':>7s} {'wall s':>7s}  last-100")
    base = None
    for procs in [int(p) for p in args.procs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={procs}",
                str(ROOT / "scripts/train.py"),
                "--config",
                str(ROOT / args.config),
                "--set",
                f"total_timesteps={args.timesteps}",
                "--log-dir",
                f"{tmp}/run",
                *[x for o in args.overrides for x in ("--set", o)],
            ]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{procs} processes failed:\n{done.stderr[-3000:]}")
            result = json.loads((Path(tmp) / "run" / "result.json").read_text())
        loop = result["wall_time_s"]
        rate = result["timesteps"] / loop
        base = base or rate
        ret = "n/a" if result["last100_return"] is None else f"{result['last100_return']:.1f}"
        print(f"{procs:5d} {rate:9.0f} {rate / base:8.2f}x {loop:7.1f} {wall:7.1f}  {ret}")


if __name__ == "__main__":
    main()
