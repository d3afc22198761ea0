"""rl-baselines3-zoo trains our SB3 algorithms from configs/zoo/ through scripts/zoo.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rl_kfac.sb3 import ACKTR, PPOKFAC

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algo, cls", [("acktr", ACKTR), ("ppo_kfac", PPOKFAC)])
def test_rl_zoo_trains_and_saves(algo, cls, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts/zoo.py"), "--algo", algo, "--env", "CartPole-v1",
           "--conf-file", str(ROOT / f"configs/zoo/{algo}.yml"), "-n", "480", "-f", str(tmp_path),
           "--eval-freq", "-1", "--seed", "0"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (saved,) = tmp_path.glob(f"{algo}/CartPole-v1_*/CartPole-v1.zip")
    model = cls.load(saved)
    assert model.n_steps == 20 and model.num_timesteps >= 480
    assert model.policy.optimizer.counters["steps"] > 0
