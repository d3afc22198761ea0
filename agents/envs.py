"""Vector environments: gymnasium's Sync/AsyncVectorEnv with same-step autoreset.

Each sub-environment records its episode statistics (gymnasium's RecordEpisodeStatistics) before
any reward transformation, so logged returns are the environment's own. Atari ids (``ALE/...``)
get AtariPreprocessing (84x84 grey, frame skip 4, up to 30 no-ops), 4-frame stacking and reward
clipping to its sign for training.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def check_env_id(env_id: str) -> None:
    """A clear ``ValueError`` for an id gymnasium does not know."""
    if is_atari(env_id):
        import ale_py

        gym.register_envs(ale_py)
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ValueError(f"unknown env id {env_id!r}: {err}") from None


def _make_one(env_id: str, frame_stack: int) -> Callable[[], gym.Env]:
    def thunk() -> gym.Env:
        if is_atari(env_id):
            import ale_py

            gym.register_envs(ale_py)
            env = gym.make(env_id, frameskip=1)
            env = gym.wrappers.AtariPreprocessing(env, frame_skip=4, noop_max=30, screen_size=84)
            env = gym.wrappers.FrameStackObservation(env, frame_stack)
            env = gym.wrappers.RecordEpisodeStatistics(env)
            return gym.wrappers.TransformReward(env, lambda r: float(np.sign(float(r))))
        return gym.wrappers.RecordEpisodeStatistics(gym.make(env_id))

    return thunk


def make_vec_env(
    env_id: str, n_envs: int, vec_env: str = "sync", frame_stack: int = 4
) -> VectorEnv:
    check_env_id(env_id)
    thunks = [_make_one(env_id, frame_stack) for _ in range(n_envs)]
    if vec_env == "async":
        return AsyncVectorEnv(thunks, autoreset_mode=AutoresetMode.SAME_STEP)
    return SyncVectorEnv(thunks, autoreset_mode=AutoresetMode.SAME_STEP)
