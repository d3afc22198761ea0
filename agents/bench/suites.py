"""The named suites, their tasks and default run plans, and which shipped configs were tuned.

One run is (algorithm, environment, seed). Algorithms: our agents ``acktr`` and ``ppo_kfac``
(``scripts/train.py``'s trainer with ``configs/<algo>/<task>.yaml``), ``sb3_acktr`` and
``sb3_ppo_kfac`` (``rl_kfac.sb3`` with the same settings, ``agents.sb3_settings``), and the
reference ``a2c`` / ``ppo`` / ``recurrent_ppo``: Stable-Baselines3 (sb3-contrib's
``RecurrentPPO``) with rl-baselines3-zoo's hyperparameters as installed with ``rl_zoo3``
(``ppo_lstm.yml`` for ``recurrent_ppo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

OURS = ("acktr", "ppo_kfac")
SB3_KFAC = ("sb3_acktr", "sb3_ppo_kfac")
REFERENCE = ("a2c", "ppo", "recurrent_ppo")
ALGOS = OURS + SB3_KFAC + REFERENCE
NAMES = {
    "acktr": "ACKTR (rl-kfac)",
    "ppo_kfac": "PPO-KFAC (rl-kfac)",
    "a2c": "A2C (SB3, rl-zoo)",
    "ppo": "PPO (SB3, rl-zoo)",
    "sb3_acktr": "rl_kfac.sb3.ACKTR",
    "sb3_ppo_kfac": "rl_kfac.sb3.PPOKFAC",
    "recurrent_ppo": "RecurrentPPO (sb3-contrib, rl-zoo)",
}
ZOO_FILES = {"a2c": "a2c", "ppo": "ppo", "recurrent_ppo": "ppo_lstm"}  # rl-zoo's hyperparams


@dataclass(frozen=True)
class Task:
    """One environment of a suite.

    ``threshold``: the return whose first crossing by the last-100 mean is the "steps to
    threshold" metric. ``goals``: per algorithm, the final last-100 median (over seeds 0-4) an
    issue asks for, with where the number comes from. ``plan``: the default seeds per algorithm.
    ``zoo``: the key of rl-zoo's hyperparameter files for the SB3 reference.
    """

    env: str
    config: str  # configs/<algo>/<config>.yaml
    threshold: float
    timesteps: int
    zoo: str
    plan: dict[str, range]
    goals: dict[str, float] = field(default_factory=dict)
    env_packages: tuple[str, ...] = ()

    def config_path(self, algo: str) -> str:
        return f"configs/{'ppo_kfac' if 'ppo' in algo else 'acktr'}/{self.config}.yaml"


def _all(seeds: range) -> dict[str, range]:
    """Every algorithm for feed-forward policies."""
    return dict.fromkeys((*OURS, *SB3_KFAC, "a2c", "ppo"), seeds)


_MUJOCO_PLAN = {"acktr": range(5), "ppo_kfac": range(5), "ppo": range(1)}
# rl-baselines3-zoo's benchmark at 1M steps (benchmark.md): the best on-policy result per task
# (SB3 PPO or sb3-contrib TRPO) for PPO-KFAC; SB3 A2C / TRPO for ACKTR
SUITES: dict[str, dict[str, Task]] = {
    "classic": {
        t.env: t
        for t in (
            Task("CartPole-v1", "cartpole", 475.0, 100_000, "CartPole-v1", _all(range(5))),
            Task("Acrobot-v1", "acrobot", -100.0, 100_000, "Acrobot-v1", _all(range(5))),
            Task("LunarLander-v3", "lunarlander", 200.0, 500_000, "LunarLander-v3", _all(range(5))),
            Task("Pendulum-v1", "pendulum", -200.0, 300_000, "Pendulum-v1", _all(range(5))),
        )
    },
    "mujoco": {
        t.env: t
        for t in (
            Task(
                "HalfCheetah-v5", "halfcheetah", 5819.0, 1_000_000, "HalfCheetah-v4",
                _MUJOCO_PLAN, {"ppo_kfac": 5819.0, "acktr": 3041.0},
            ),
            Task(
                "Hopper-v5", "hopper", 3618.0, 1_000_000, "Hopper-v4",
                _MUJOCO_PLAN, {"ppo_kfac": 3618.0, "acktr": 3618.0},
            ),
            Task(
                "Walker2d-v5", "walker2d", 4933.0, 1_000_000, "Walker2d-v4",
                _MUJOCO_PLAN, {"ppo_kfac": 4933.0, "acktr": 4933.0},
            ),
            Task(
                "Ant-v5", "ant", 4982.0, 1_000_000, "Ant-v4", _MUJOCO_PLAN, {"ppo_kfac": 4982.0}
            ),
        )
    },
    "atari": {
        t.env: t
        for t in (
            Task(
                "ALE/Pong-v5", "pong", 18.0, 2_000_000, "atari",
                {"acktr": range(2), "ppo_kfac": range(1), "a2c": range(1)},
            ),
            # 31.8: the human score in the ACKTR paper's table
            Task("ALE/Breakout-v5", "breakout", 31.8, 2_000_000, "atari", {"acktr": range(1)}),
        )
    },
    # a third-party package's environment (Farama's minigrid): our agents see the 7x7x3 grid
    # through ImgObsWrapper (configs/*/minigrid.yaml), SB3 PPO rl-zoo's FlatObsWrapper and MLP
    # partially observed: rl-zoo's velocity-masked tasks, for recurrent policies (our configs
    # *_novel.yaml) against sb3-contrib's RecurrentPPO with rl-zoo's ppo_lstm settings
    "recurrent": {
        t.env: t
        for t in (
            Task(
                "CartPoleNoVel-v1", "cartpole_novel", 475.0, 200_000, "CartPoleNoVel-v1",
                dict.fromkeys(("acktr", "ppo_kfac", "recurrent_ppo"), range(5)),
                env_packages=("rl_zoo3.import_envs",),
            ),
            Task(
                "PendulumNoVel-v1", "pendulum_novel", -200.0, 100_000, "PendulumNoVel-v1",
                dict.fromkeys(("acktr", "ppo_kfac", "recurrent_ppo"), range(5)),
                env_packages=("rl_zoo3.import_envs",),
            ),
            # rl-zoo's ppo_lstm settings are listed under v2 (5M steps there)
            Task(
                "LunarLanderNoVel-v3", "lunarlander_novel", 200.0, 2_000_000,
                "LunarLanderNoVel-v2",
                dict.fromkeys(("acktr", "ppo_kfac", "recurrent_ppo"), range(5)),
                env_packages=("rl_zoo3.import_envs",),
            ),
        )
    },
    "minigrid": {
        "MiniGrid-DoorKey-5x5-v0": Task(
            "MiniGrid-DoorKey-5x5-v0", "minigrid", 0.9, 100_000, "MiniGrid-DoorKey-5x5-v0",
            {"acktr": range(5), "ppo_kfac": range(5), "ppo": range(5)},
            env_packages=("minigrid",),
        )
    },
}  # fmt: skip


def find_task(env: str) -> tuple[str, Task]:
    """The suite and task of ``env``."""
    for suite, tasks in SUITES.items():
        if env in tasks:
            return suite, tasks[env]
    known = ", ".join(e for tasks in SUITES.values() for e in tasks)
    raise ValueError(f"no suite has {env!r}; known: {known}")


# Which seeds each shipped config was tuned on (None: an untuned starting point). Held-out
# seeds in the report are the ones after these. A test checks every config file is listed.
TUNED_ON: dict[str, range | None] = {
    "acktr/cartpole": range(3),
    "ppo_kfac/cartpole": range(3),
    "acktr/acrobot": range(3),
    "ppo_kfac/acrobot": None,
    "acktr/lunarlander": range(5),
    "ppo_kfac/lunarlander": range(5),
    "acktr/pendulum": range(1),
    "ppo_kfac/pendulum": range(3),
    "acktr/halfcheetah": range(3),
    "ppo_kfac/halfcheetah": range(3),
    "acktr/hopper": range(3),
    "ppo_kfac/hopper": range(3),
    "acktr/walker2d": range(3),
    "ppo_kfac/walker2d": range(3),
    "acktr/ant": None,
    "ppo_kfac/ant": range(3),
    "acktr/pong": None,
    "ppo_kfac/pong": None,
    "acktr/breakout": None,
    "ppo_kfac/breakout": None,
    "acktr/minigrid": None,
    "ppo_kfac/minigrid": None,
    "acktr/cartpole_novel": None,
    "ppo_kfac/cartpole_novel": None,
    "acktr/pendulum_novel": None,
    "ppo_kfac/pendulum_novel": range(3),
    "acktr/lunarlander_novel": None,
    "ppo_kfac/lunarlander_novel": range(3),
}


def tuning_seeds(task: Task, algo: str) -> range | None:
    """The seeds the config behind ``algo`` on ``task`` was tuned on (SB3 K-FAC classes share
    our configs; the rl-zoo reference was tuned elsewhere: None)."""
    if algo in REFERENCE:
        return None
    return TUNED_ON.get(task.config_path(algo)[len("configs/") : -len(".yaml")])
