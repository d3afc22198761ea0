"""The training loop: collect → update → log → checkpoint, with exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.acktr import ACKTR
from agents.algorithm import KFACAlgorithm, Stats, explained_variance
from agents.checkpoint import (
    load_checkpoint,
    restore,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from agents.config import Config, from_dict, to_yaml
from agents.envs import check_env_id, make_vec_env
from agents.episode_log import EpisodeLog
from agents.memory import max_rss_mib, release_free_heap, rss_mib
from agents.networks import ActorCritic
from agents.normalize import Normalizer
from agents.ppo_kfac import PPOKFAC
from agents.provenance import device_name, provenance
from agents.rollout import RolloutCollector
from agents.signals import StopSignals, TrainingInterrupted
from rl_kfac.distributed import average_scalar, init_distributed
from rl_kfac.threads import auto_threads, idle_cores

ALGORITHMS: dict[str, type[KFACAlgorithm]] = {"acktr": ACKTR, "ppo_kfac": PPOKFAC}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What one ``Trainer.train()`` call did (``result.json`` in the run directory)."""

    run_dir: Path
    timesteps: int  # in total, all ranks, including steps of an earlier run resumed from
    episodes: list[tuple[int, float, int]] = field(default_factory=list)  # (step, return, len)
    wall_time: float = 0.0  # seconds of the training loop in this call
    update_time: float = 0.0  # of which in the algorithm's updates

    def summary(self) -> dict[str, Any]:
        returns = [r for _, r, _ in self.episodes[-100:]]
        return {
            "timesteps": self.timesteps,
            "wall_time_s": round(self.wall_time, 3),
            "update_time_s": round(self.update_time, 3),
            "episodes": len(self.episodes),
            "last100_return": float(np.mean(returns)) if returns else None,
        }


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each process takes the GPU of its local rank."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


class Trainer:
    """Owns envs, policy, algorithm, logger and checkpoints of one run.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs one Trainer with its own environments
    and seed; updates are averaged across ranks (see :class:`agents.algorithm.KFACAlgorithm`),
    ``timesteps`` counts all ranks' steps, and rank 0 alone logs and writes checkpoints.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        # Everything that can reject the input runs before anything is written.
        self.cfg = cfg.validate()
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"run directory {run_dir} is a file")
        if resume is None and run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"run directory {run_dir} is not empty; pass --resume {run_dir}/last.pt "
                "or choose another --log-dir"
            )
        check_env_id(cfg.env_id, cfg.env_packages, cfg.env_kwargs)
        # idle cores matter for large networks only; measured before env workers start
        idle = idle_cores() if cfg.threads is None and cfg.expects_images() else None
        self.device = _rank_device(resolve_device(cfg.device))
        self.comm = init_distributed(self.device)  # every rank has passed the checks above
        self.rank = self.comm.rank if self.comm else 0
        self.world_size = self.comm.world_size if self.comm else 1
        seed_everything(cfg.seed)
        self.envs = make_vec_env(cfg.env_id, cfg.n_envs, **cfg.env_options())
        obs_space = self.envs.single_observation_space
        # The initial weights must not depend on the thread count the process started with: the
        # orthogonal init's QR differs in its last bits between 1 and 2 threads, which grows into
        # other episodes (scripts/train.py started at torch's default, the benchmark at 1)
        torch.set_num_threads(1)
        try:
            self.policy = ActorCritic(obs_space, self.envs.single_action_space, cfg.policy_spec())
        except ValueError:
            self.envs.close()
            raise
        self.policy.to(self.device)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.threads = cfg.threads or auto_threads(self.policy, idle, processes)
        torch.set_num_threads(self.threads)
        if self.comm is not None:  # same initial weights everywhere, own action noise per rank
            self.comm.broadcast(list(self.policy.state_dict().values()), src=0)
            seed_everything(cfg.seed + self.rank)
        try:
            self.algo = ALGORITHMS[cfg.algo](self.policy, cfg, self.comm)
        except ValueError:
            self.envs.close()
            raise
        assert obs_space.shape is not None
        self.normalizer = Normalizer(
            obs_space.shape, cfg.n_envs, cfg.gamma, cfg.normalize_obs, cfg.normalize_reward
        )
        self.timesteps = self.updates = 0
        self.wall_before = 0.0  # training seconds of the earlier parts of a resumed run
        self._clock: float | None = None  # when this part's training loop started
        env_seed = cfg.seed
        if resume is not None:
            try:
                restore(self.policy, resume["policy"], "policy")
                restore(self.algo.optimizer, resume["optimizer"], "optimizer state")
                restore(self.normalizer, resume["normalizer"], "normalizer")
            except ValueError:
                self.envs.close()
                raise
            self.timesteps, self.updates = int(resume["timesteps"]), int(resume["updates"])
            self.wall_before = float(resume.get("wall_time", 0.0))
            try:
                set_rng_state(resume["rng"])  # rank 0's: other ranks re-seed below
            except (RuntimeError, ValueError, TypeError, KeyError) as err:
                self.envs.close()
                msg = f"the checkpoint's RNG state does not fit this machine: {err}"
                raise ValueError(msg) from None
            env_seed = cfg.seed + self.updates  # fresh episodes, not the ones already seen
        if self.rank > 0:
            seed_everything(cfg.seed + self.rank + 7919 * self.updates)
            env_seed += 1_000_003 * self.rank
        self.collector = RolloutCollector(
            self.envs,
            self.policy,
            cfg.n_steps,
            cfg.gamma,
            cfg.gae_lambda,
            self.normalizer,
            self.device,
            env_seed,
        )
        self.run_dir = run_dir
        self.writer: SummaryWriter | None = None
        self.episode_log: EpisodeLog | None = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.episode_log = EpisodeLog(self.run_dir / "episodes.csv", self.timesteps)
            # purge_step drops events logged after the checkpoint by an interrupted earlier run
            # (the point at the checkpoint's own step was logged before it was saved: kept)
            self.writer = SummaryWriter(
                str(self.run_dir), purge_step=self.timesteps + 1 if self.timesteps else None
            )
        self.show_progress = progress and sys.stderr.isatty() and self.rank == 0

    def __repr__(self) -> str:
        return (
            f"Trainer({self.cfg.algo} on {self.cfg.env_id}, run_dir={str(self.run_dir)!r}, "
            f"timesteps={self.timesteps}, updates={self.updates}, rank={self.rank}/"
            f"{self.world_size})"
        )

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.algo.optimizer.state_dict(),
            "normalizer": self.normalizer.state_dict(),
            "timesteps": self.timesteps,
            "updates": self.updates,
            "rng": rng_state(),
            "config": dataclasses.asdict(self.cfg),
            "wall_time": self.wall_time,
        }

    @property
    def wall_time(self) -> float:
        """Seconds in the training loop so far, earlier parts of a resumed run included."""
        now = 0.0 if self._clock is None else time.perf_counter() - self._clock
        return self.wall_before + now

    def save(self, name: str = "last.pt") -> Path:
        path = self.run_dir / name
        self.algo.optimizer.synchronize()  # every rank: none may leave with an all-reduce pending
        if self.rank == 0:  # all ranks hold the same weights and optimizer state
            if self.episode_log is not None:  # every episode up to the checkpoint is on disk
                self.episode_log.flush()
            save_checkpoint(path, self.state())
        return path

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(self.run_dir, self.timesteps)
        bar = tqdm(
            total=cfg.total_timesteps,
            initial=self.timesteps,
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        start = self._clock = time.perf_counter()
        start_steps = self.timesteps
        next_checkpoint = (self.timesteps // cfg.checkpoint_interval + 1) * cfg.checkpoint_interval
        try:
            with StopSignals() as stop:
                while self.timesteps < cfg.total_timesteps:
                    batch = self.collector.collect()
                    steps = len(batch) * self.world_size
                    t0 = time.perf_counter()
                    progress = (self.timesteps + steps) / cfg.total_timesteps
                    stats = self.algo.update(batch, progress)
                    result.update_time += time.perf_counter() - t0
                    # counted once the update is done: a checkpoint never holds half of one
                    self.timesteps += steps
                    self.updates += 1
                    # the collector counts this rank's steps; timesteps count every rank's
                    finished = [
                        (start_steps + s * self.world_size, r, n)
                        for s, r, n in self.collector.finished
                    ]
                    self.collector.finished.clear()
                    result.episodes += finished
                    if self.episode_log is not None:
                        self.episode_log.append(finished)
                    fps = (self.timesteps - start_steps) / (time.perf_counter() - start)
                    if self.updates % cfg.log_interval == 0:
                        release_free_heap()  # every rank: fragmentation would read as a leak
                        if self.writer is not None:
                            # the critic as it was when the rollout was collected, as SB3 logs it
                            ev = explained_variance(batch.values, batch.returns)
                            self._log(self.writer, {**stats, "train/explained_variance": ev}, fps)
                    bar.update(steps)
                    if self.collector.episode_returns:
                        ep = float(np.mean(self.collector.episode_returns))
                        bar.set_postfix(fps=f"{fps:.0f}", ep_rew=f"{ep:.1f}", refresh=False)
                    saved = self.timesteps >= next_checkpoint
                    if saved:
                        self.save()
                        next_checkpoint += cfg.checkpoint_interval
                    if self.timesteps >= cfg.total_timesteps:
                        break  # done: a signal now changes nothing
                    if self._stop_requested(stop):
                        path = str(self.run_dir / "last.pt") if saved else str(self.save())
                        self._barrier()  # no rank exits while rank 0 is writing
                        raise TrainingInterrupted(stop.received or signal.SIGTERM, path)
                self.save()  # still under the handlers: a signal cannot cut the final save
        except TrainingInterrupted as stopped:
            print(f"\nstopped by {stopped}", file=sys.stderr)
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: the update in progress is not saved
            print(
                f"\ninterrupted: the last checkpoint is {self.run_dir / 'last.pt'}", file=sys.stderr
            )
            raise
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.flush()
            if self.episode_log is not None:
                self.episode_log.flush()
        self.close()
        result.timesteps = self.timesteps
        result.wall_time = time.perf_counter() - start
        self.wall_before, self._clock = self.wall_time, None
        if self.rank == 0:
            summary = {
                **result.summary(),
                "wall_time_total_s": round(self.wall_time, 3),  # all parts of a resumed run
                "threads": self.threads,
                "max_rss_mib": max_rss_mib(),
                "device": device_name(self.device),
                **provenance(),
            }
            (self.run_dir / "result.json").write_text(json.dumps(summary, indent=1))
        self._barrier()  # the ranks leave together, after rank 0's last write
        return result

    def _barrier(self) -> None:
        if self.comm is not None:
            average_scalar(0.0, self.comm)  # a collective every rank reaches after the save

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether a stop signal arrived (on any rank: all stop after the same update)."""
        if self.comm is None:
            return stop.received is not None
        return average_scalar(float(stop.received is not None), self.comm) > 0

    def _log(self, writer: SummaryWriter, stats: Stats, fps: float) -> None:
        step = self.timesteps
        if self.collector.episode_returns:  # rank 0's episodes
            writer.add_scalar("rollout/ep_rew_mean", np.mean(self.collector.episode_returns), step)
            writer.add_scalar("rollout/ep_len_mean", np.mean(self.collector.episode_lengths), step)
        writer.add_scalar("time/fps", fps, step)
        writer.add_scalar("rollout/nonfinite_inputs", self.collector.nonfinite_inputs, step)
        rss = rss_mib()
        if rss is not None:
            writer.add_scalar("time/rss_mib", rss, step)  # a leak shows as a rising curve
        writer.add_scalar("time/threads", self.threads, step)
        # the only device->host reads: the optimizer's ν and counters too are read only here
        for key, value in {**self.algo.optimizer.diagnostics.scalars(), **stats}.items():
            writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.episode_log is not None:
            self.episode_log.close()
        self.envs.close()


def trainer_from_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None, run_dir: str | Path | None = None
) -> Trainer:
    """Continue a run: config from the checkpoint (plus overrides, e.g. total_timesteps).

    It continues in the checkpoint's own directory, or in ``run_dir`` if that is new or empty:
    another run's files are never written over.
    """
    payload = load_checkpoint(path)
    own = Path(path).parent
    target = Path(run_dir) if run_dir is not None else own
    if (
        target.resolve() != own.resolve()
        and target.exists()
        and (not target.is_dir() or any(target.iterdir()))
    ):
        raise ValueError(
            f"{target} is not empty and is not the directory of {path}: a resumed run continues "
            "in its own directory or in a new one"
        )
    cfg = from_dict({**payload["config"], **(overrides or {})})
    done = int(payload["timesteps"])
    if cfg.total_timesteps <= done:
        raise ValueError(
            f"total_timesteps {cfg.total_timesteps} is not above the checkpoint's {done} steps: "
            "nothing to train (--total-timesteps N to go on)"
        )
    return Trainer(cfg, target, resume=payload)
