"""Vector environments with same-step autoreset.

Episode statistics are recorded before any reward transformation, so logged returns are the
environment's own. Atari ids (``ALE/...``) get 84x84 grey frames, frame skip 4 with the max of
the last two frames, up to 30 no-op starts, the v5 sticky actions (0.25), ``frame_stack``
stacked frames, episodes of whole games, and rewards clipped to their sign for training, either

- ``vec_env: native`` (``auto``'s choice for Atari): ale-py's ``AtariVectorEnv``, which steps the
  games in C++ threads and does this preprocessing itself (it starts an episode's frame stack
  with blank frames, as SB3's ``VecFrameStack`` does, where gymnasium repeats the first); or
- ``vec_env: sync | async``: gymnasium's Sync/AsyncVectorEnv of ``AtariPreprocessing`` and
  ``FrameStackObservation`` wrapped games (the path every other environment takes).
"""

from __future__ import annotations

import multiprocessing
import signal
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
        if multiprocessing.parent_process() is not None:  # an AsyncVectorEnv worker
            # Ctrl-C reaches the whole process group: the trainer stops the run and closes us
            signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    env_id: str, n_envs: int, vec_env: str = "auto", frame_stack: int = 4
) -> VectorEnv:
    check_env_id(env_id)
    if vec_env == "native" or (vec_env == "auto" and is_atari(env_id)):
        return _native_atari(env_id, n_envs, frame_stack)
    thunks = [_make_one(env_id, frame_stack) for _ in range(n_envs)]
    if vec_env == "async":
        return AsyncVectorEnv(thunks, autoreset_mode=AutoresetMode.SAME_STEP)
    return SyncVectorEnv(thunks, autoreset_mode=AutoresetMode.SAME_STEP)


def rom_name(env_id: str) -> str:
    """``ALE/SpaceInvaders-v5`` → ``space_invaders``: the ROM ale-py registered the id with."""
    check_env_id(env_id)
    return str(gym.spec(env_id).kwargs["game"])


def _native_atari(env_id: str, n_envs: int, frame_stack: int) -> VectorEnv:
    from ale_py.vector_env import AtariVectorEnv

    if not is_atari(env_id) or not env_id.endswith("-v5"):
        raise ValueError(f"vec_env 'native' runs ALE/<Game>-v5 ids, got {env_id!r}")
    envs = AtariVectorEnv(
        rom_name(env_id),
        n_envs,
        autoreset_mode="SameStep",
        stack_num=frame_stack,
        frameskip=4,
        maxpool=True,
        noop_max=30,
        repeat_action_probability=0.25,  # the v5 default, as gym.make gives the other path
        episodic_life=False,
        use_fire_reset=False,
        reward_clipping=False,  # the game's own returns are recorded first, then clipped
    )
    recorded = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    return gym.wrappers.vector.TransformReward(recorded, np.sign)


def finished_episodes(info: dict) -> list[tuple[float, int]]:
    """``(return, length)`` of the episodes that ended in this step, from either path's info
    (per-environment statistics land in ``final_info``, vector-level ones at the top)."""
    source = info.get("final_info")
    if not source or "episode" not in source:
        source = info
    if "episode" not in source:
        return []
    mask = source["_episode"]
    return [
        (float(r), int(n))
        for r, n in zip(source["episode"]["r"][mask], source["episode"]["l"][mask])
    ]
