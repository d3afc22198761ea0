"""Config validation, checkpoints (atomic, exact resume), the command line, a learning run."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import checkpoint as ckpt
from agents.cli import evaluate_main, train_main
from agents.config import Config, load_config
from agents.trainer import Trainer, trainer_from_checkpoint
from rl_kfac.fisher import GAUSSIAN_LOG_STD_FISHER

CARTPOLE = "configs/acktr/cartpole.yaml"


class TupleActionToy(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Tuple([gym.spaces.Discrete(2), gym.spaces.Discrete(3)])

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


def register_tuple_action_toy():
    if "TupleActionToy-v0" not in gym.registry:
        gym.register("TupleActionToy-v0", entry_point=TupleActionToy)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learning_rate=0.1"], "unknown config key(s) ['learning_rate']; valid keys: algo,"),
        (["lr=0"], "lr must be > 0"),
        (["kl_clip=-1"], "kl_clip must be > 0 or null"),
        (["gamma=1.5"], "gamma must be in [0, 1]"),
        (["damping_mode=levenberg"], "damping_mode must be one of"),
        (["n_envs=2.5"], "n_envs must be int"),
        (["hidden=[]"], "hidden must be a non-empty list"),
        (["nonsense"], "--set expects key=value"),
    ],
)
def test_config_errors_are_one_clear_line(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(CARTPOLE, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_shipped_config_is_valid():
    from pathlib import Path

    paths = sorted(Path("configs").glob("*/*.yaml"))
    assert len(paths) == 28  # acktr and ppo_kfac, 14 environments each
    for path in paths:
        load_config(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "env_id=NoSuchEnv-v0"], "unknown env id 'NoSuchEnv-v0'"),
        (["--set", "env_id=TupleActionToy-v0"], "unsupported action space"),
        (["--set", "bogus=1"], "unknown config key(s) ['bogus']"),
        (["--set", "kl_clip=0"], "kl_clip must be > 0"),
        (["--set", "log_std_fisher=true"], "log_std_fisher needs a Gaussian policy"),
        (["--set", "kl_guard=0"], "kl_guard must be > 0 with a kl_clip"),
        (["--set", "kl_guard=-2"], "kl_guard must be > 0 with a kl_clip"),
        (["--set", "kl_guard=.inf"], "kl_guard must be finite"),
        (["--set", "kl_guard=.nan"], "kl_guard must be finite"),
        (["--set", "kl_guard=2", "--set", "kl_clip=null"], "kl_guard must be > 0 with a kl_clip"),
        (["--set", "kl_guard_backtracks=-1"], "kl_guard_backtracks must be >= 0"),
        (["--set", "vf_kl_clip=0"], "vf_kl_clip must be > 0"),
    ],
)
def test_cli_rejects_bad_input_before_writing_anything(tmp_path, capsys, args, message):
    register_tuple_action_toy()
    run_dir = tmp_path / "run"
    code = train_main(["--config", CARTPOLE, "--log-dir", str(run_dir), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_unreadable_checkpoint_is_one_line_and_nothing_is_lost(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    assert train_main(["--resume", str(bad)]) == 2
    assert "is unreadable" in capsys.readouterr().err
    assert bad.read_bytes() == b"not a checkpoint"
    assert evaluate_main([str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"policy": {"w": torch.ones(2)}, "config": {}})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"policy": {"w": torch.zeros(2)}, "config": {}})
    assert torch.equal(ckpt.load_checkpoint(path, required=())["policy"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def small_config(**kw) -> Config:
    base = load_config(CARTPOLE, ["n_envs=4", "n_steps=8", "total_timesteps=4000"])
    for key, value in kw.items():
        setattr(base, key, value)
    return base.validate()


@pytest.mark.parametrize("kl_clip_target", [None, 1e-9])
def test_resume_gives_a_bit_identical_next_update(tmp_path, kl_clip_target):
    cfg = small_config(momentum=0.9, normalize_obs=True, kl_clip_target=kl_clip_target)
    trainer = Trainer(cfg, tmp_path / "a", progress=False)
    for _ in range(5):
        batch = trainer.collector.collect()
        trainer.timesteps += len(batch)
        trainer.algo.update(batch, trainer.timesteps / 4000)
        trainer.updates += 1
    path = trainer.save()
    batch = trainer.collector.collect()  # the same batch goes to both
    rng = torch.get_rng_state()

    resumed = trainer_from_checkpoint(path, run_dir=tmp_path / "b")
    torch.set_rng_state(rng)
    resumed.algo.update(batch, 0.5)
    torch.set_rng_state(rng)
    trainer.algo.update(batch, 0.5)
    for p, q in zip(trainer.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q)
    assert resumed.normalizer.state_dict() == ckpt.load_checkpoint(path)["normalizer"]
    assert resumed.algo.optimizer.counters == trainer.algo.optimizer.counters
    # an adapted trust-region radius is part of the state (a target this small shrinks it)
    assert resumed.algo.optimizer.kl_clip == trainer.algo.optimizer.kl_clip
    assert (trainer.algo.optimizer.kl_clip < cfg.kl_clip) == (kl_clip_target is not None)
    trainer.close()
    resumed.close()


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def test_train_command_logs_checkpoints_evaluates_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        CARTPOLE,
        "--log-dir",
        str(run_dir),
        "--total-timesteps",
        "3200",
        "--set",
        "log_interval=2",
        "--no-progress",
    ]
    assert train_main(args) == 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "last.pt").exists()
    tags = set(scalars(run_dir).Tags()["scalars"])
    expected = {
        "rollout/ep_rew_mean",
        "rollout/ep_len_mean",
        "time/fps",
        "train/policy_loss",
        "train/value_loss",
        "train/entropy",
        "train/approx_kl",
        "train/learning_rate",
        "train/explained_variance",
        "kfac/step_scale",
        "kfac/damping",
        "kfac/quadratic",
        "kfac/skipped_steps",
    }
    assert expected <= tags
    assert evaluate_main([str(run_dir / "last.pt"), "--episodes", "2"]) == 0
    assert "mean return" in capsys.readouterr().out

    resume = ["--resume", str(run_dir / "last.pt"), "--total-timesteps", "6400", "--no-progress"]
    assert train_main(resume) == 0
    steps = [e.step for e in scalars(run_dir).Scalars("train/learning_rate")]
    assert steps == sorted(steps) and steps[-1] > 3200 and steps[0] <= 3200
    lrs = [e.value for e in scalars(run_dir).Scalars("train/learning_rate")]
    assert lrs[-1] < lrs[0]  # the linear schedule really decays


@pytest.mark.slow
def test_short_seeded_run_improves(tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(CARTPOLE, ["total_timesteps=25000", "seed=3"])
    result = Trainer(cfg, tmp_path, progress=False).train()
    returns = [r for _, r, _ in result.episodes]
    first, last = np.mean(returns[:30]), np.mean(returns[-30:])
    assert last > 3 * first and last > 100, (first, last)


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"precious")
    assert train_main(["--config", CARTPOLE, "--log-dir", str(run_dir)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (run_dir / "last.pt").read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("configs/acktr/pendulum.yaml", ["n_envs=2", "n_steps=16", "total_timesteps=96"]),
        ("configs/ppo_kfac/pendulum.yaml", ["n_envs=2", "n_steps=16", "total_timesteps=96"]),
        (
            "configs/acktr/pendulum.yaml",
            ["n_envs=2", "n_steps=16", "total_timesteps=96", "log_std_fisher=true"],
        ),
        (
            "configs/acktr/pong.yaml",
            [
                "n_envs=2",
                "n_steps=4",
                "total_timesteps=24",
                "conv_approx=reduce",
                "factor_update_interval=1",
            ],
        ),
    ],
)
def test_continuous_and_atari_configs_run(tmp_path, config, overrides):
    trainer = Trainer(load_config(config, overrides), tmp_path, progress=False)
    space = trainer.envs.single_action_space
    result = trainer.train()
    cfg = trainer.cfg
    per_update = cfg.n_envs * cfg.n_steps
    assert result.timesteps == cfg.total_timesteps == 3 * per_update
    assert trainer.updates == 3
    minibatches = -(-per_update // min(cfg.batch_size, per_update))
    per_update_steps = 1 if cfg.algo == "acktr" else cfg.n_epochs * minibatches
    counters = trainer.algo.optimizer.counters
    assert counters["statistics_updates"] == 3 * per_update_steps
    # the linear schedule reaches lr 0 at the last update, which then takes no step
    assert counters["steps"] == 2 * per_update_steps
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["timesteps"] == result.timesteps
    assert summary["episodes"] == len(result.episodes)
    assert summary["threads"] == torch.get_num_threads() >= 1
    assert summary["max_rss_mib"] > 50  # a python process with torch
    assert len(trainer.algo.optimizer.blocks) == (3 + 3 if "pendulum" in config else 4 + 2)
    if "pong" in config:
        assert trainer.collector.obs.dtype == torch.uint8
        assert trainer.collector.obs.shape[2:] == (4, 84, 84)
    else:
        assert isinstance(space, gym.spaces.Box)
        assert trainer.policy.log_std is not None
        assert trainer.policy.log_std.grad is not None  # plain-gradient parameter in the step
        last = trainer.algo.optimizer.param_groups[-1]
        if cfg.log_std_fisher:  # in a group of its own, preconditioned by its exact Fisher
            assert last["params"] == [trainer.policy.log_std]
            assert last["fisher_diagonal"] == GAUSSIAN_LOG_STD_FISHER
        else:
            assert "fisher_diagonal" not in last


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["configs/acktr/cartpole.yaml", "configs/ppo_kfac/cartpole.yaml"]
)
def test_cartpole_configs_reach_475(tmp_path, config):
    """The tuned CartPole configs solve the task (last-100 mean ≥ 475) within their 100k steps
    on seed 0 (the README's table: about 56k and 58k steps)."""
    torch.set_num_threads(1)
    result = Trainer(load_config(config), tmp_path, progress=False).train()
    returns = [r for _, r, _ in result.episodes]
    best = max(np.mean(returns[i - 100 : i]) for i in range(100, len(returns) + 1))
    assert best >= 475, best


def test_config_reaches_every_kfac_argument_it_names():
    import inspect

    from agents.algorithm import KFAC_KEYS
    from agents.config import FIELDS
    from rl_kfac import KFAC

    params = inspect.signature(KFAC).parameters
    assert all(key in params and key in FIELDS for key in KFAC_KEYS)
    # the rest are set by the agents themselves (lr by the schedule) or fixed
    assert set(params) - set(KFAC_KEYS) == {
        "model_or_params",
        "model",  # the policy, with the parameter groups
        "lr",
        "communicator",
        "factor_dtype",
        "statistics",
        "host_sync",  # "auto": by the device
    }


def test_episodes_csv_holds_every_episode_once_across_an_interrupted_resume(tmp_path):
    from agents.episode_log import read_episodes

    run = tmp_path / "run"
    first = Trainer(small_config(total_timesteps=1600), run, progress=False)
    result = first.train()
    logged = read_episodes(run / "episodes.csv")
    assert logged == [(s, pytest.approx(r, rel=1e-5), n) for s, r, n in result.episodes]
    assert len(logged) > 10 and all(n > 0 for _, _, n in logged)
    # an interrupted continuation wrote episodes after the checkpoint: they are dropped
    with open(run / "episodes.csv", "a") as f:
        f.write("1700,9.0,9\n1800,10.0,10\n")
    resumed = trainer_from_checkpoint(run / "last.pt", {"total_timesteps": 3200})
    more = resumed.train()
    rows = read_episodes(run / "episodes.csv")
    assert rows[: len(logged)] == logged
    assert [s for s, _, _ in rows] == sorted(s for s, _, _ in rows)
    assert len(rows) == len(logged) + len(more.episodes)
    assert all(s > 1600 for s, _, _ in rows[len(logged) :])
