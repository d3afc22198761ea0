"""Command lines: ``rl-kfac-train`` / ``scripts/train.py`` and ``scripts/evaluate.py``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents.checkpoint import check_finite, load_checkpoint, restore
from agents.config import from_dict, load_config, parse_override
from agents.episode_log import read_episodes
from agents.signals import TrainingInterrupted


def _count(text: str) -> int:
    """A positive step count, written as an integer or in float notation (``1e5``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_integer() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(value)


def add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rl-kfac-train",
        description="Train ACKTR or PPO-KFAC from a YAML config; logs to TensorBoard.",
    )
    parser.add_argument("--config", help="configs/<algo>/<env>.yaml")
    add_override_argument(parser, "override a config key (repeatable)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--total-timesteps", type=_count, help="e.g. 100000 or 1e5")
    parser.add_argument("--threads", type=int, help="torch threads (default: auto)")
    parser.add_argument(
        "--log-dir", help="run directory (default runs/<env>_<algo>_s<seed>_<time>)"
    )
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for key, value in (
        ("seed", args.seed),
        ("device", args.device),
        ("total_timesteps", args.total_timesteps),
        ("threads", args.threads),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")

    from agents.trainer import Trainer, trainer_from_checkpoint

    try:
        if args.resume:
            if args.config is not None:
                raise ValueError(
                    "--config cannot be combined with --resume: a resumed run keeps its "
                    "checkpoint's config (change single keys with --set KEY=VALUE)"
                )
            extra = dict(parse_override(o) for o in overrides)
            trainer = trainer_from_checkpoint(args.resume, extra, args.log_dir)
        else:
            if args.config is None:
                raise ValueError("--config is required (or --resume CHECKPOINT)")
            cfg = load_config(args.config, overrides)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            env = cfg.env_id.replace("/", "-")
            run_dir = args.log_dir or f"runs/{env}_{cfg.algo}_s{cfg.seed}_{stamp}"
            trainer = Trainer(cfg, run_dir, progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from rl_kfac.distributed import DistributedError, exit_after_failure, shutdown

    main = trainer.rank == 0
    if main:
        print(f"run directory: {trainer.run_dir}  (tensorboard --logdir {trainer.run_dir.parent})")
        how = "auto" if trainer.cfg.threads is None else "set"
        print(f"torch threads: {trainer.threads} ({how}; --threads N to choose)")
        cfg = trainer.cfg
        batch = cfg.n_envs * cfg.n_steps * trainer.world_size
        if cfg.total_timesteps % batch:
            end = -(-cfg.total_timesteps // batch) * batch
            print(
                f"note: total_timesteps {cfg.total_timesteps} is not a multiple of the batch "
                f"({batch} = n_envs x n_steps x ranks): the run ends at {end}"
            )
    try:
        result = trainer.train()
    except TrainingInterrupted as stopped:
        return stopped.exit_code
    except KeyboardInterrupt:
        return 130
    except DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        exit_after_failure(1)
    finally:
        shutdown()
    log = trainer.run_dir / "episodes.csv"  # the whole run's, resumed parts included
    episodes = read_episodes(log) if main and log.exists() else result.episodes
    returns = [r for _, r, _ in episodes[-100:]]
    mean = f"{np.mean(returns):.1f}" if returns else "n/a"
    who = f"rank 0 of {trainer.world_size}: " if trainer.world_size > 1 else ""
    if main:
        done = f"done: {result.timesteps} steps in {result.wall_time:.1f}s"
        print(f"{done}, {who}last-100 return {mean}")
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mean/std return of the deterministic policy.")
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from agents.envs import finished_episodes, make_vec_env
    from agents.networks import ActorCritic
    from agents.normalize import Normalizer
    from agents.trainer import resolve_device

    try:
        if args.episodes <= 0:
            raise ValueError(f"--episodes must be > 0, got {args.episodes}")
        payload = load_checkpoint(args.checkpoint, required=("policy", "normalizer", "config"))
        cfg = from_dict(payload["config"])
        device = resolve_device(args.device)
        envs = make_vec_env(cfg.env_id, 1, **cfg.env_options())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        obs_space = envs.single_observation_space
        assert obs_space.shape is not None
        policy = ActorCritic(obs_space, envs.single_action_space, cfg.policy_spec()).to(device)
        restore(policy, payload["policy"], "policy")
        check_finite(policy, args.checkpoint)
        norm = Normalizer(obs_space.shape, 1, cfg.gamma, cfg.normalize_obs, False)
        restore(norm, payload["normalizer"], "normalizer")
    except ValueError as err:
        envs.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    policy.eval()
    norm.training = False
    returns: list[float] = []
    obs, _ = envs.reset(seed=args.seed)
    state, start = policy.initial_state(1), torch.ones(1, dtype=torch.bool, device=device)
    while len(returns) < args.episodes:
        x = torch.as_tensor(norm.observations(obs, update=False), device=device)
        with torch.no_grad():
            if policy.recurrent:
                dist, _, state = policy.step(x, state, start)
            else:
                dist, _ = policy(x)
        obs, _, terminated, truncated, info = envs.step(policy.head.to_env(dist.mode()))
        start = torch.as_tensor(terminated | truncated, device=device)
        returns += [r for r, _ in finished_episodes(info)]
    envs.close()
    print(
        f"{cfg.env_id}: mean return {np.mean(returns):.2f} ± {np.std(returns):.2f} "
        f"over {len(returns)} episodes ({Path(args.checkpoint).name})"
    )
    return 0
