"""End-to-end training throughput: our ACKTR and PPO-KFAC next to SB3 A2C and PPO, same envs x
steps, and the raw environment throughput, in one run.

Agent steps per second of the whole training loop (rollouts and updates). Our agents run
``scripts/train.py`` with the task's config (steps/s from its ``result.json``, which also gives
the peak resident memory); SB3's A2C (RMSprop) and PPO (Adam) get the same ``n_envs`` x
``n_steps`` (PPO also the same minibatch size and epochs), the same torch thread count, and
SB3's own environment stack (``make_atari_env`` + 4-frame stack for Atari). Raw environment
throughput: random actions through each environment stack.

    python scripts/bench_throughput.py [--tasks pong,halfcheetah] [--updates 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "pong": ("ALE/Pong-v5", "configs/acktr/pong.yaml", "configs/ppo_kfac/pong.yaml"),
    "halfcheetah": (
        "HalfCheetah-v5",
        "configs/acktr/halfcheetah.yaml",
        "configs/ppo_kfac/halfcheetah.yaml",
    ),
}


def ours(config: str, updates: int) -> dict[str, Any]:
    from agents.config import load_config

    cfg = load_config(ROOT / config)
    with tempfile.TemporaryDirectory() as tmp:
        budget = str(cfg.n_envs * cfg.n_steps * updates)
        cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", str(ROOT / config)]
        cmd += ["--total-timesteps", budget, "--log-dir", f"{tmp}/run", "--no-progress"]
        subprocess.run(cmd, check=True, capture_output=True)
        result = json.loads((Path(tmp) / "run" / "result.json").read_text())
    result["steps_per_s"] = result["timesteps"] / result["wall_time_s"]
    return result


def sb3(algo: str, config: str, updates: int, threads: int) -> float:
    import torch
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.env_util import make_atari_env, make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from agents.config import load_config
    from agents.envs import is_atari

    cfg = load_config(ROOT / config)
    torch.set_num_threads(threads)
    if is_atari(cfg.env_id):
        import ale_py
        import gymnasium

        gymnasium.register_envs(ale_py)
        envs = make_atari_env(cfg.env_id, cfg.n_envs, seed=0, env_kwargs={"frameskip": 1})
        envs = VecFrameStack(envs, 4)
        policy = "CnnPolicy"
    else:
        envs, policy = make_vec_env(cfg.env_id, cfg.n_envs, seed=0), "MlpPolicy"
    if algo == "a2c":
        model: Any = A2C(policy, envs, n_steps=cfg.n_steps, device="cpu", seed=0)
    else:
        sizes: dict[str, Any] = {"n_steps": cfg.n_steps, "batch_size": cfg.batch_size}
        sizes["n_epochs"] = cfg.n_epochs
        model = PPO(policy, envs, device="cpu", seed=0, **sizes)
    steps = cfg.n_envs * cfg.n_steps * updates
    start = time.perf_counter()
    model.learn(steps)
    rate = steps / (time.perf_counter() - start)
    envs.close()
    return rate


def raw_env(config: str, seconds: float = 5.0) -> dict[str, float]:
    """Random-action steps per second of each environment stack for the config's n_envs."""
    import numpy as np
    from stable_baselines3.common.env_util import make_atari_env, make_vec_env

    from agents.config import load_config
    from agents.envs import is_atari
    from agents.envs import make_vec_env as our_vec_env

    cfg = load_config(ROOT / config)
    stacks: dict[str, Any] = {}
    if is_atari(cfg.env_id):
        stacks["ours: ale-py native"] = lambda: our_vec_env(cfg.env_id, cfg.n_envs, "native")
        stacks["ours: gymnasium sync"] = lambda: our_vec_env(cfg.env_id, cfg.n_envs, "sync")
        stacks["ours: gymnasium async"] = lambda: our_vec_env(cfg.env_id, cfg.n_envs, "async")
        stacks["SB3 make_atari_env"] = lambda: make_atari_env(
            cfg.env_id, cfg.n_envs, env_kwargs={"frameskip": 1}
        )
    else:
        stacks["ours: gymnasium sync"] = lambda: our_vec_env(cfg.env_id, cfg.n_envs, "sync")
        stacks["SB3 DummyVecEnv"] = lambda: make_vec_env(cfg.env_id, cfg.n_envs)
    rates = {}
    for name, build in stacks.items():
        envs = build()
        sb3_env = not hasattr(envs, "single_action_space")  # SB3's VecEnv: no seed in reset
        single = envs.action_space if sb3_env else envs.single_action_space
        if sb3_env:
            envs.reset()
        else:
            envs.reset(seed=0)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            envs.step(np.stack([single.sample() for _ in range(cfg.n_envs)]))
            steps += cfg.n_envs
        rates[name] = steps / (time.perf_counter() - start)
        envs.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--updates", type=int, default=20, help="updates per training run")
    args = parser.parse_args()
    import torch

    print(f"torch={torch.__version__}; machine otherwise idle is assumed; one run at a time")
    for task in args.tasks.split(","):
        env_id, acktr_cfg, ppo_cfg = TASKS[task]
        print(f"\n{env_id}: agent steps/s, {args.updates} updates each")
        pairs = (("ACKTR (ours)", acktr_cfg, "a2c"), ("PPO-KFAC (ours)", ppo_cfg, "ppo"))
        for name, config, algo in pairs:
            mine = ours(config, args.updates)
            theirs = sb3(algo, config, args.updates, mine["threads"])
            print(
                f"  {name:16s} {mine['steps_per_s']:8.0f}   SB3 {algo.upper():3s} {theirs:8.0f}"
                f"   ratio {mine['steps_per_s'] / theirs:5.2f}   threads {mine['threads']}"
                f"   peak RSS {mine['max_rss_mib']} MiB",
                flush=True,
            )
        for name, rate in raw_env(acktr_cfg).items():
            print(f"  raw env, random actions: {name:24s} {rate:8.0f} steps/s", flush=True)


if __name__ == "__main__":
    main()
