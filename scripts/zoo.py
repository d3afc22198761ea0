"""Train rl_kfac.sb3.ACKTR / PPOKFAC with rl-baselines3-zoo (its CLI, callbacks, saving, tuning).

Registers ``acktr`` and ``ppo_kfac`` in rl_zoo3's algorithm table, then runs rl_zoo3's own
``train`` with the command line unchanged. Needs ``pip install -e ".[zoo]"``.

    python scripts/zoo.py --algo acktr --env CartPole-v1 --conf-file configs/zoo/acktr.yml
    python scripts/zoo.py --algo ppo_kfac --env HalfCheetah-v5 --conf-file configs/zoo/ppo_kfac.yml
"""

from __future__ import annotations

from rl_zoo3 import ALGOS
from rl_zoo3.train import train

from rl_kfac.sb3 import ACKTR, PPOKFAC

ALGOS["acktr"] = ACKTR
ALGOS["ppo_kfac"] = PPOKFAC

if __name__ == "__main__":
    train()
