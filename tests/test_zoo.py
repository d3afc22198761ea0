"""rl-baselines3-zoo trains our SB3 algorithms from configs/zoo/ through scripts/zoo.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from agents.config import load_config
from agents.sb3_settings import sb3_arguments, zoo_entry, zoo_hyperparams
from rl_kfac.sb3 import ACKTR, PPOKFAC

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algo, cls", [("acktr", ACKTR), ("ppo_kfac", PPOKFAC)])
def test_rl_zoo_trains_and_saves(algo, cls, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts/zoo.py"),
        "--algo",
        algo,
        "--env",
        "CartPole-v1",
        "--conf-file",
        str(ROOT / f"configs/zoo/{algo}.yml"),
        "-n",
        "480",
        "-f",
        str(tmp_path),
        "--eval-freq",
        "-1",
        "--seed",
        "0",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (saved,) = tmp_path.glob(f"{algo}/CartPole-v1_*/CartPole-v1.zip")
    model = cls.load(saved)
    assert model.n_steps == 20 and model.num_timesteps >= 480
    assert model.policy.optimizer.counters["steps"] > 0


@pytest.mark.parametrize("algo", ["acktr", "ppo_kfac"])
def test_zoo_hyperparams_are_generated_from_the_configs(algo):
    """configs/zoo/*.yml restate nothing: `scripts/zoo.py --write-hyperparams` makes them."""
    committed = (ROOT / f"configs/zoo/{algo}.yml").read_text()
    assert committed == zoo_hyperparams(algo, ROOT / "configs"), (
        "run scripts/zoo.py --write-hyperparams"
    )


# Hopper's config moved from KL damping to fixed damping + the radius control; the class keeps
# KL damping by default (RecurrentPPOKFAC inherits it), as its docstring says.
KL_DAMPING = ["damping_adaptation=kl", "damping_target_kl=0.003", "kl_clip_target=null"]


@pytest.mark.parametrize(
    "cls, config, overrides",
    [(ACKTR, None, []), (PPOKFAC, "configs/ppo_kfac/hopper.yaml", KL_DAMPING)],
)
def test_sb3_class_defaults_are_the_documented_settings(cls, config, overrides):
    """ACKTR's defaults are the paper's (agents.config.Config's); PPOKFAC's the Hopper config's
    with KL damping. The learning rate is the other documented difference: constant in the
    classes, linear decay in the configs."""
    cfg = load_config(ROOT / config if config else None, overrides)
    expected = sb3_arguments(cfg)
    assert expected.pop("learning_rate") == f"lin_{cls.defaults['learning_rate']:g}"
    shared = set(expected) & set(cls.defaults)
    assert shared >= {"n_steps", "gamma", "kl_clip", "momentum", "damping_target_kl"}
    assert {k: cls.defaults[k] for k in shared} == {k: expected[k] for k in shared}


@pytest.mark.parametrize(
    "override, message",
    [
        ("damping_adaptation=lm", "Levenberg-Marquardt"),
        ("vf_steps=3", "vf_steps"),
        ("shared_trunk=true", "separate actor and critic"),
    ],
)
def test_settings_rl_kfac_sb3_lacks_are_refused_not_dropped(override, message):
    cfg = load_config(ROOT / "configs/acktr/hopper.yaml", [override])
    with pytest.raises(ValueError, match=message):
        sb3_arguments(cfg)


def test_the_clip_lr_setting_reaches_the_sb3_optimizer():
    """``kl_clip_lr`` is a K-FAC argument: the zoo entry passes it in ``optimizer_kwargs``."""
    cfg = load_config(ROOT / "configs/ppo_kfac/pendulum.yaml", ["kl_clip_lr=initial"])
    policy_kwargs = eval(zoo_entry(cfg)["policy_kwargs"], {"dict": dict, "nn": nn})  # as rl-zoo
    assert policy_kwargs["optimizer_kwargs"]["kl_clip_lr"] == "initial"
    model = PPOKFAC("MlpPolicy", "Pendulum-v1", policy_kwargs=policy_kwargs)
    assert model.policy.optimizer.kl_clip_lr == "initial"
