"""Running observation normalisation and return-based reward scaling (as SB3's VecNormalize).

Both work on host numpy arrays before the one host-to-device copy of a step, and their state is
saved with checkpoints so that evaluation and resumed training see the same statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RunningMeanStd:
    """Mean and variance of a stream of batches (parallel algorithm of Chan et al. 1979)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def __repr__(self) -> str:
        return f"RunningMeanStd(shape={self.mean.shape}, count={self.count:g})"

    def update(self, batch: np.ndarray) -> None:
        b_mean, b_var, b_count = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = np.asarray(state["mean"], np.float64)
        self.var = np.asarray(state["var"], np.float64)
        self.count = float(state["count"])


class Normalizer:
    """Observation normalisation (clip ±10) and reward scaling by the std of discounted returns."""

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        n_envs: int,
        gamma: float,
        obs: bool,
        reward: bool,
        clip: float = 10.0,
    ) -> None:
        self.obs_rms = RunningMeanStd(obs_shape) if obs else None
        self.ret_rms = RunningMeanStd() if reward else None
        self.returns = np.zeros(n_envs, np.float64)
        self.gamma, self.clip, self.training = gamma, clip, True

    def __repr__(self) -> str:
        return (
            f"Normalizer(obs={self.obs_rms is not None}, reward={self.ret_rms is not None}, "
            f"gamma={self.gamma}, clip={self.clip}, training={self.training})"
        )

    def observations(self, obs: np.ndarray, update: bool | None = None) -> np.ndarray:
        if self.obs_rms is None:
            return obs
        if self.training if update is None else update:
            self.obs_rms.update(obs)
        z = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def rewards(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        if self.ret_rms is None:
            return rewards
        self.returns = self.returns * self.gamma + rewards
        if self.training:
            self.ret_rms.update(self.returns)
        self.returns[dones] = 0.0
        return np.clip(rewards / np.sqrt(self.ret_rms.var + 1e-8), -self.clip, self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {
            "obs": None if self.obs_rms is None else self.obs_rms.state_dict(),
            "ret": None if self.ret_rms is None else self.ret_rms.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.obs_rms is not None and state["obs"] is not None:
            self.obs_rms.load_state_dict(state["obs"])
        if self.ret_rms is not None and state["ret"] is not None:
            self.ret_rms.load_state_dict(state["ret"])
