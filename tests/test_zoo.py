"""rl-baselines3-zoo trains our SB3 algorithms from configs/zoo/ through scripts/zoo.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
# what the classes add to the paper's settings and the configs' (rl_kfac.sb3.algorithms.ROBUST)
ROBUST = ["kl_clip_lr=initial", "kl_guard=2.0", "vf_kl_clip=1.0"]
# what ACKTR adds for the one environment SB3 makes from an env id (rl_kfac.sb3.algorithms)
ONE_ENV = ["n_steps=128", "kl_clip=0.01", "momentum=0.0", "gae_lambda=0.95", "ent_coef=0.0"]


@pytest.mark.parametrize(
    "cls, config, overrides",
    [
        (ACKTR, None, ROBUST + ONE_ENV),
        (PPOKFAC, "configs/ppo_kfac/hopper.yaml", KL_DAMPING + ROBUST),
    ],
)
def test_sb3_class_defaults_are_the_documented_settings(cls, config, overrides):
    """ACKTR's defaults are the paper's (agents.config.Config's) with ONE_ENV; PPOKFAC's the
    Hopper config's with KL damping; both with ROBUST: the KL guard, the critic's own trust
    region and the clip at the initial learning rate, which decays linearly to 0."""
    cfg = load_config(ROOT / config if config else None, overrides)
    expected = sb3_arguments(cfg)
    schedule = cls.defaults["learning_rate"]
    assert expected.pop("learning_rate") == f"lin_{schedule(1.0):g}"
    assert schedule(0.5) == schedule(1.0) / 2 and schedule(0.0) == 0
    shared = set(expected) & set(cls.defaults)
    assert shared >= {"n_steps", "gamma", "kl_clip", "momentum", "damping_target_kl", "kl_guard"}
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


@pytest.mark.parametrize("clip_lr", ["initial", "current"])
def test_the_clip_lr_setting_reaches_the_sb3_optimizer(clip_lr):
    """``kl_clip_lr`` is a K-FAC argument of the SB3 classes, written in the zoo entry where it
    differs from the class's default (``"initial"``)."""
    cfg = load_config(ROOT / "configs/ppo_kfac/pendulum.yaml", [f"kl_clip_lr={clip_lr}"])
    entry = zoo_entry(cfg)
    assert entry.get("kl_clip_lr", PPOKFAC.defaults["kl_clip_lr"]) == clip_lr
    model = PPOKFAC("MlpPolicy", "Pendulum-v1", kl_clip_lr=entry.get("kl_clip_lr", clip_lr))
    assert model.policy.optimizer.kl_clip_lr == clip_lr


def test_the_papers_acktr_is_one_argument_away():
    """``ACKTR(..., **PAPER)``: the paper code's ACKTR, without what the defaults add."""
    from rl_kfac.sb3 import PAPER

    model = ACKTR("MlpPolicy", "CartPole-v1", **PAPER, device="cpu")
    opt = model.policy.optimizer
    assert (model.n_steps, model.gae_lambda, model.ent_coef) == (20, 1.0, 0.01)
    assert (opt.kl_clip, opt.kl_guard, opt.kl_clip_lr) == (1e-3, None, "current")
    assert opt.param_groups[0]["momentum"] == 0.9 and len(opt.param_groups) == 1
    assert model.lr_schedule(0.0) == 0.25  # constant
