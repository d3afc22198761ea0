"""One benchmark run, resumable: our trainer or a Stable-Baselines3 model, in its own directory.

A run directory holds ``episodes.csv`` (every finished episode: step, return, length) and, when
finished, ``result.json``. Our agents checkpoint through the trainer (``last.pt``); SB3 models
through :class:`Checkpoints`. Calling :func:`run` again on an interrupted directory continues
from its last checkpoint: our trainer exactly, an SB3 model with fresh environments and RNG
streams (SB3 saves neither). A directory interrupted before its first checkpoint is moved aside
(``<name>.interrupted-N``), never written over.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from agents.bench.suites import OURS, ZOO_FILES, Task
from agents.episode_log import EpisodeLog, read_episodes


@dataclass(frozen=True)
class RunSpec:
    """One run: algorithm, task, seed and budget, its directory, and how it is made.

    ``overrides``: ``--set`` values for our configs (``acktr``, ``ppo_kfac``, ``sb3_*``);
    ``speed``: SB3 runs take the batch shape (``n_envs × n_steps``) of our config for the task,
    for wall-time comparisons."""

    algo: str
    task: Task
    seed: int
    timesteps: int
    run_dir: Path
    overrides: tuple[str, ...] = ()
    checkpoint_interval: int = 100_000
    speed: bool = False


def run(spec: RunSpec) -> dict[str, Any]:
    """Train (or finish) one run; its ``result.json`` as a dict. ``RunInProgress`` if another
    process is training it."""
    import torch

    torch.set_num_threads(1)
    run_dir = spec.run_dir
    done = run_dir / "result.json"
    with claimed(run_dir):
        if not (done.exists() and json.loads(done.read_text())["timesteps"] >= spec.timesteps):
            checkpoint = run_dir / ("last.pt" if spec.algo in OURS else "progress.json")
            if run_dir.exists() and any(run_dir.iterdir()) and not checkpoint.exists():
                run_dir.rename(aside(run_dir, "interrupted"))
            (_train_ours if spec.algo in OURS else _train_sb3)(spec)
        return json.loads(done.read_text())


class RunInProgress(RuntimeError):
    """Another process holds the run directory's claim."""


@contextmanager
def claimed(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>.lock`` while the run trains, so that a second process (a second
    sitting, or a worker left behind by a killed benchmark command) cannot train into the same
    directory and overwrite its checkpoints. An advisory ``flock``, released when the process
    ends however it ends; where there is none (Windows) nothing is claimed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(f"{run_dir.name}.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise RunInProgress(
                f"{run_dir} is being trained by another process (pid {holder}); "
                "stop it or wait for it"
            ) from None
        try:
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def exit_with_parent(poll_s: float = 2.0) -> None:
    """End this process soon after the one that started it ends (a pool worker's initializer).

    A benchmark command killed with a signal to itself alone (``kill PID``; Ctrl-C reaches the
    whole process group) would otherwise leave its workers training; the run continues from its
    last checkpoint when the command is given again."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # checkpoints are written to a temporary file and renamed: none is torn

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def aside(directory: Path, why: str) -> Path:
    """A free name next to ``directory`` to move it to: ``<name>.<why>-N``."""
    n = 1
    while directory.with_name(f"{directory.name}.{why}-{n}").exists():
        n += 1
    return directory.with_name(f"{directory.name}.{why}-{n}")


def _train_ours(spec: RunSpec) -> None:
    from agents.checkpoint import load_checkpoint
    from agents.config import load_config
    from agents.trainer import Trainer, trainer_from_checkpoint

    run_dir, timesteps = spec.run_dir, spec.timesteps
    if (run_dir / "last.pt").exists():
        payload = load_checkpoint(run_dir / "last.pt")
        if int(payload["timesteps"]) >= timesteps:  # stopped after its last save: it is done
            _finished_from(payload, run_dir)
            return
        trainer = trainer_from_checkpoint(run_dir / "last.pt", {"total_timesteps": timesteps})
    else:
        settings = [f"checkpoint_interval={spec.checkpoint_interval}", *spec.overrides]
        cfg = load_config(
            spec.task.config_path(spec.algo),
            [*settings, f"seed={spec.seed}", f"total_timesteps={timesteps}", "threads=1"],
        )
        trainer = Trainer(cfg, run_dir, progress=False)
    trainer.train()


def _finished_from(payload: dict[str, Any], run_dir: Path) -> None:
    """``result.json`` of a run that stopped between its last checkpoint and writing it."""
    from agents.provenance import provenance

    wall = float(payload.get("wall_time", 0.0))
    summary = {
        "timesteps": int(payload["timesteps"]),
        "wall_time_s": wall,
        "wall_time_total_s": wall,
        "threads": 1,
        "device": "unknown",
        **provenance(),
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=1))


def zoo_settings(algo: str, task: Task, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """rl-zoo's hyperparameters for the SB3 reference algorithms; our config's (with
    ``overrides``) for ``sb3_*``. ``KeyError`` if rl-zoo has no entry for the task."""
    if algo.startswith("sb3_"):
        from agents.config import load_config
        from agents.sb3_settings import zoo_entry

        return zoo_entry(load_config(task.config_path(algo), list(overrides)))
    import rl_zoo3
    import yaml

    path = Path(rl_zoo3.__file__).parent / "hyperparams" / f"{ZOO_FILES[algo]}.yml"
    return dict(yaml.safe_load(path.read_text())[task.zoo])


def _linear(initial: float, progress_remaining: float) -> float:
    """rl-zoo's ``lin_<x>`` schedule, held at 0 when the last rollout overruns the budget
    (SB3's progress then goes below 0: a negative learning rate would step uphill)."""
    return max(progress_remaining, 0.0) * initial


def sb3_model_arguments(settings: dict[str, Any]) -> dict[str, Any]:
    """SB3 constructor arguments from an rl-zoo entry, read as rl-zoo reads them: ``lin_<x>``
    schedules decay linearly to 0, ``policy_kwargs`` strings are evaluated with ``nn`` and
    SB3's ``RMSpropTFLike`` in scope; the keys about environments are left out."""
    import torch
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    kwargs = {k: v for k, v in settings.items() if k not in ENV_KEYS}
    for key in ("learning_rate", "clip_range"):
        value = kwargs.get(key)
        if isinstance(value, str) and value.startswith("lin_"):
            kwargs[key] = functools.partial(_linear, float(value[4:]))
    if isinstance(kwargs.get("policy_kwargs"), str):
        scope = {"nn": torch.nn, "RMSpropTFLike": RMSpropTFLike}
        kwargs["policy_kwargs"] = eval(kwargs["policy_kwargs"], scope)
    return kwargs


ENV_KEYS = ("n_envs", "normalize", "n_timesteps", "env_wrapper", "frame_stack", "policy")


def make_sb3_env(task: Task, settings: dict[str, Any], seed: int) -> Any:
    """The vectorised env of an rl-zoo entry: ``env_wrapper`` (one or a list), ``frame_stack``,
    ``normalize``. ALE v5 ids are made with ``frameskip=1`` under SB3's ``AtariWrapper`` (which
    skips 4 frames itself; v5's sticky actions stay), as rl-zoo does for NoFrameskip ids.
    Episodes are recorded by SB3's Monitor, under the wrappers: whole games, raw scores."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize

    from agents.envs import check_env_id, is_atari, resolve_wrappers

    check_env_id(task.env, task.env_packages)  # imports the packages, registers ALE ids
    wrappers = settings.get("env_wrapper", [])
    wrappers = resolve_wrappers(wrappers if isinstance(wrappers, list) else [wrappers])

    def wrap(env: Any) -> Any:
        for cls, options in wrappers:
            env = cls(env, **options)
        return env

    env_kwargs = {"frameskip": 1} if is_atari(task.env) else None
    envs = make_vec_env(
        task.env,
        n_envs=settings.get("n_envs", 1),
        seed=seed,
        wrapper_class=wrap,
        env_kwargs=env_kwargs,
    )
    normalize = settings.get("normalize", False)
    if normalize:  # rl-zoo's order: normalise, then stack frames
        options = eval(normalize, {}) if isinstance(normalize, str) else {}
        envs = VecNormalize(envs, gamma=settings.get("gamma", 0.99), **options)
    if settings.get("frame_stack"):
        envs = VecFrameStack(envs, settings["frame_stack"])
    return envs


def _train_sb3(spec: RunSpec) -> None:
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

    from agents.provenance import provenance
    from rl_kfac.sb3 import ACKTR, PPOKFAC

    classes: dict[str, type[OnPolicyAlgorithm]] = {
        "a2c": A2C,
        "ppo": PPO,
        "sb3_acktr": ACKTR,
        "sb3_ppo_kfac": PPOKFAC,
        "recurrent_ppo": RecurrentPPO,
    }
    algo, task, seed, run_dir = spec.algo, spec.task, spec.seed, spec.run_dir
    cls = classes[algo]
    settings = zoo_settings(algo, task, spec.overrides)
    if spec.speed:
        from agents.config import load_config

        cfg = load_config(task.config_path(algo))
        settings.update(n_envs=cfg.n_envs, n_steps=cfg.n_steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = run_dir / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else None
    done = int(state["timesteps"]) if state else 0
    envs = make_sb3_env(task, settings, seed + done)  # a resumed run: fresh episodes
    if state is None:
        model = cls(settings.get("policy", "MlpPolicy"), envs, seed=seed, device="auto",
                    **sb3_model_arguments(settings))  # fmt: skip
        (run_dir / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    else:
        if state["vecnormalize"]:
            envs = _load_normalization(envs, run_dir / state["vecnormalize"])
        model = cls.load(run_dir / state["model"], env=envs, device="auto")
        model.set_random_seed(seed + done)  # load() re-seeds with the run's seed: new streams
    callback = Checkpoints(run_dir, spec.checkpoint_interval, state)
    model.learn(
        spec.timesteps - model.num_timesteps, callback=callback, reset_num_timesteps=state is None
    )
    callback.save(model)
    summary = {
        "timesteps": int(model.num_timesteps),
        "wall_time_total_s": round(callback.wall(), 3),
        "update_time_s": round(callback.update_time, 3),
        "threads": 1,
        "device": str(model.device),
        **provenance(),
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=1))
    envs.close()


def _load_normalization(envs: Any, path: Path) -> Any:
    """``envs`` with its VecNormalize (under a possible VecFrameStack) loaded from ``path``."""
    from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize

    if isinstance(envs, VecFrameStack):
        return VecFrameStack(_load_normalization(envs.venv, path), envs.n_stack)
    assert isinstance(envs, VecNormalize)
    return VecNormalize.load(str(path), envs.venv)


class Checkpoints(BaseCallback):
    """Finished episodes to ``episodes.csv``; the time spent in updates (from the end of one
    rollout to the start of the next); every ``interval`` steps the model, the VecNormalize
    statistics and then ``progress.json``, which names them (a crash between the two leaves the
    previous checkpoint whole)."""

    def __init__(self, run_dir: Path, interval: int, state: dict[str, Any] | None) -> None:
        super().__init__()
        done = int(state["timesteps"]) if state else 0
        self.run_dir, self.interval = run_dir, interval
        self.log = EpisodeLog(run_dir / "episodes.csv", resume_from=done)
        self.wall_before = float(state["wall_s"]) if state else 0.0
        self.update_time = float(state["update_s"]) if state else 0.0
        self.next_save = (done // interval + 1) * interval
        self._start = time.perf_counter()
        self._rollout_end: float | None = None
        self._saved = done

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self._start

    def _on_step(self) -> bool:
        finished = [
            (self.num_timesteps, float(info["episode"]["r"]), int(info["episode"]["l"]))
            for info in self.locals["infos"]
            if "episode" in info
        ]
        if finished:
            self.log.append(finished)
        return True

    def _on_rollout_end(self) -> None:
        self._rollout_end = time.perf_counter()

    def _on_rollout_start(self) -> None:
        if self._rollout_end is not None:
            self.update_time += time.perf_counter() - self._rollout_end
            self._rollout_end = None
        if self.num_timesteps >= self.next_save:
            self.save(self.model)
            self.next_save = (self.num_timesteps // self.interval + 1) * self.interval

    def _on_training_end(self) -> None:
        self._on_rollout_start()

    def save(self, model: Any) -> None:
        self.log.flush()
        steps = int(model.num_timesteps)
        if steps == self._saved:  # the files of this step exist and progress.json names them
            return
        self._saved = steps
        name = f"model_{steps}.zip"
        model.save(self.run_dir / name)
        envs = model.get_vec_normalize_env()
        if envs is not None:
            envs.save(str(self.run_dir / f"vecnormalize_{steps}.pkl"))
        progress = {
            "timesteps": steps,
            "model": name,
            "vecnormalize": f"vecnormalize_{steps}.pkl" if envs is not None else None,
            "wall_s": self.wall(),
            "update_s": self.update_time,
        }
        path = self.run_dir / "progress.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress))
        tmp.replace(path)
        for key in ("model", "vecnormalize"):  # the previous checkpoint's files
            if old.get(key) and old[key] != progress[key]:
                (self.run_dir / old[key]).unlink(missing_ok=True)


def episodes(run_dir: Path) -> list[tuple[int, float]]:
    """The finished episodes of a run: (step, return)."""
    return [(s, r) for s, r, _ in read_episodes(run_dir / "episodes.csv")]
