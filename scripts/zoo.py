"""Train rl_kfac.sb3.ACKTR / PPOKFAC with rl-baselines3-zoo (its CLI, callbacks, saving, tuning).

Registers ``acktr`` and ``ppo_kfac`` in rl_zoo3's algorithm table, then runs rl_zoo3's own
``train`` with the command line unchanged. Needs ``pip install -e ".[zoo]"``.

    python scripts/zoo.py --algo acktr --env CartPole-v1 --conf-file configs/zoo/acktr.yml
    python scripts/zoo.py --algo ppo_kfac --env HalfCheetah-v5 --conf-file configs/zoo/ppo_kfac.yml

``python scripts/zoo.py --write-hyperparams`` rewrites ``configs/zoo/*.yml`` from
``configs/{acktr,ppo_kfac}/*.yaml`` (the tuned settings live there only).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_hyperparams() -> None:
    from agents.sb3_settings import zoo_hyperparams

    for algo in ("acktr", "ppo_kfac"):
        path = ROOT / "configs" / "zoo" / f"{algo}.yml"
        path.write_text(zoo_hyperparams(algo, ROOT / "configs"))
        print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    from rl_zoo3 import ALGOS
    from rl_zoo3.train import train

    from rl_kfac.sb3 import ACKTR, PPOKFAC

    ALGOS["acktr"] = ACKTR
    ALGOS["ppo_kfac"] = PPOKFAC
    train()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-hyperparams"]:
        write_hyperparams()
    else:
        main()
