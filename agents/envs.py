"""Vector environments with same-step autoreset, from any registered Gymnasium id.

Environments from other packages: ``env_packages`` are imported first (``module`` registers its
ids on import; ``module:function`` calls a registration function), ``env_kwargs`` go to
``gym.make`` and ``wrappers`` (import paths, each with its keyword arguments) wrap each
environment in order, as rl-baselines3-zoo's ``--gym-packages``, ``env_kwargs`` and
``env_wrapper`` do. Observation spaces other than a Box are then flattened for storage
(:class:`agents.spaces.EncodeObservation`).

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

import importlib
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from agents.distributions import ActionHead
from agents.spaces import EncodeObservation, check_observation_space

Wrapper = str | dict[str, dict[str, Any]]  # "module.Class" or {"module.Class": {kwargs}}


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def _import(path: str, what: str) -> Any:
    """The object at ``package.module.name`` or ``package.module:name``."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}: cannot import {path!r} ({err})") from None


def import_env_packages(packages: Sequence[str]) -> None:
    """Import each package (its ids register on import) or call ``module:function``."""
    for package in packages:
        if ":" in package:
            register = _import(package, "env_packages")
            if not callable(register):
                raise ValueError(f"env_packages: {package!r} is not a function")
            register()
            continue
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise ValueError(f"env_packages: cannot import {package!r} ({err})") from None


def resolve_wrappers(wrappers: Sequence[Wrapper]) -> list[tuple[Callable[..., gym.Env], dict]]:
    """``(class, kwargs)`` of each wrapper entry, checked."""
    out = []
    for entry in wrappers:
        if isinstance(entry, dict) and len(entry) == 1:
            ((path, kwargs),) = entry.items()
            kwargs = kwargs or {}
        elif isinstance(entry, str):
            path, kwargs = entry, {}
        else:
            raise ValueError(
                f"wrappers: each entry is 'module.Class' or {{'module.Class': {{kwargs}}}}, "
                f"got {entry!r}"
            )
        if not isinstance(kwargs, dict):
            raise ValueError(f"wrappers: the arguments of {path!r} must be a mapping")
        cls = _import(path, "wrappers")
        if not callable(cls):
            raise ValueError(f"wrappers: {path!r} is not a class or function")
        out.append((cls, kwargs))
    return out


def check_env_id(
    env_id: str, env_packages: Sequence[str] = (), env_kwargs: dict[str, Any] | None = None
) -> None:
    """A clear ``ValueError`` for an id gymnasium does not know (after importing the packages
    that register ids) or ``env_kwargs`` it rejects."""
    import_env_packages(env_packages)
    if is_atari(env_id):
        import ale_py

        gym.register_envs(ale_py)
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        unnamed = isinstance(err, (gym.error.NameNotFound, gym.error.NamespaceNotFound))
        hint = " (does a package register it? `env_packages`)" if unnamed else ""
        raise ValueError(f"unknown env id {env_id!r}: {err}{hint}") from None
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise ValueError(f"env_kwargs must be a mapping, got {env_kwargs!r}")


def _make_one(
    env_id: str,
    frame_stack: int,
    env_kwargs: dict[str, Any],
    wrappers: list[tuple[Callable[..., gym.Env], dict]],
    env_packages: Sequence[str],
) -> Callable[[], gym.Env]:
    def thunk() -> gym.Env:
        if multiprocessing.parent_process() is not None:  # an AsyncVectorEnv worker
            # Ctrl-C reaches the whole process group: the trainer stops the run and closes us
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            import_env_packages(env_packages)  # a spawned worker has not imported them
        if is_atari(env_id):
            import ale_py

            gym.register_envs(ale_py)
            env = gym.make(env_id, frameskip=1, **env_kwargs)
            env = gym.wrappers.AtariPreprocessing(env, frame_skip=4, noop_max=30, screen_size=84)
            env = gym.wrappers.FrameStackObservation(env, frame_stack)
            env = _wrap(env, wrappers)
            env = gym.wrappers.RecordEpisodeStatistics(env)
            return gym.wrappers.TransformReward(env, lambda r: float(np.sign(float(r))))
        env = gym.wrappers.RecordEpisodeStatistics(_wrap(gym.make(env_id, **env_kwargs), wrappers))
        if not isinstance(env.observation_space, gym.spaces.Box):
            env = EncodeObservation(env)
        return env

    return thunk


def _wrap(env: gym.Env, wrappers: list[tuple[Callable[..., gym.Env], dict]]) -> gym.Env:
    for cls, kwargs in wrappers:
        env = cls(env, **kwargs)
    return env


def make_vec_env(
    env_id: str,
    n_envs: int,
    vec_env: str = "auto",
    frame_stack: int = 4,
    *,
    env_kwargs: dict[str, Any] | None = None,
    wrappers: Sequence[Wrapper] = (),
    env_packages: Sequence[str] = (),
) -> VectorEnv:
    """``n_envs`` copies; one is made first, and its spaces checked, so that bad input is one
    ``ValueError`` line before any worker starts."""
    check_env_id(env_id, env_packages, env_kwargs)
    env_kwargs = dict(env_kwargs or {})
    resolved = resolve_wrappers(wrappers)
    if vec_env == "native" or (vec_env == "auto" and is_atari(env_id)):
        if env_kwargs or wrappers:
            raise ValueError(
                "env_kwargs and wrappers need vec_env 'sync' or 'async' for Atari ids "
                "(ale-py's native vector env takes neither)"
            )
        return _native_atari(env_id, n_envs, frame_stack)
    thunks = [_make_one(env_id, frame_stack, env_kwargs, resolved, env_packages)] * n_envs
    probe = _probe(thunks[0], env_id)
    if vec_env == "async":
        probe.close()
        return AsyncVectorEnv(thunks, autoreset_mode=AutoresetMode.SAME_STEP)
    return SyncVectorEnv([lambda: probe, *thunks[1:]], autoreset_mode=AutoresetMode.SAME_STEP)


def _probe(thunk: Callable[[], gym.Env], env_id: str) -> gym.Env:
    """One environment, its spaces checked (one-line errors for what no policy here takes)."""
    try:
        env = thunk()
    except gym.error.Error as err:
        raise ValueError(f"cannot make {env_id}: {err}") from None
    except (TypeError, ImportError) as err:  # arguments it does not take; missing packages
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot make {env_id}: {message}") from None
    try:
        check_observation_space(getattr(env.observation_space, "source", env.observation_space))
        ActionHead(env.action_space)
    except ValueError:
        env.close()
        raise
    return env


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
