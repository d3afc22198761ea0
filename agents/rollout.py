"""Rollout collection into storage preallocated on the device, and GAE(λ) / n-step returns.

Per environment step exactly one host→device copy happens (the next observations; a recurrent
policy also needs the episode-start flags); rewards and episode ends stay on the host until the
rollout is complete and move in one copy. The only device→host copy is the actions the
environments need.

Time limits: when an episode is *truncated* (not terminated), its last reward is bootstrapped
with ``γ V(final observation)`` and the return does not run into the next episode; a terminated
episode is not bootstrapped (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import Tensor

from agents.distributions import Distribution
from agents.envs import finished_episodes
from agents.networks import ActorCritic
from agents.normalize import Normalizer


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    episode_ends: Tensor,
    last_values: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns for ``(T, E)`` tensors; ``episode_ends[t]`` cuts after step t.

    ``A_t = Σ_k (γλ)^k δ_{t+k}``, ``δ_t = r_t + γ V_{t+1} (1 - end_t) − V_t``; with λ = 1 the
    returns ``A + V`` are the n-step bootstrapped returns.
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    carry = torch.zeros_like(last_values)
    not_end = 1.0 - episode_ends.to(rewards.dtype)
    for t in reversed(range(steps)):
        next_values = last_values if t == steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_values * not_end[t] - values[t]
        carry = delta + gamma * gae_lambda * not_end[t] * carry
        advantages[t] = carry
    return advantages, advantages + values


@dataclass
class Batch:
    """A rollout flattened over (time, env).

    ``obs``, ``actions``, ``log_probs`` and ``values`` are *views* of the collector's rollout
    buffers, which the next ``collect()`` overwrites: use a batch before collecting the next one,
    or ``clone()`` what must outlive it.
    """

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    # recurrent policies: (T, E) flags of the steps that begin an episode, and the policy's
    # state at the first step (see ActorCritic.initial_state); None for feed-forward ones
    starts: Tensor | None = None
    states: Tensor | None = None

    def __len__(self) -> int:
        return self.obs.shape[0]

    def rows(self, index: Tensor) -> Batch:
        """The samples ``index`` (a feed-forward policy's minibatch)."""
        return self._select(lambda x: x[index])

    def columns(self, envs: Tensor) -> Batch:
        """The whole sequences of environments ``envs`` (a recurrent policy's minibatch)."""
        assert self.starts is not None and self.states is not None
        steps, n = self.starts.shape
        picked = self._select(
            lambda x: x.reshape(steps, n, *x.shape[1:])[:, envs].reshape(-1, *x.shape[1:])
        )
        return dataclasses.replace(
            picked, starts=self.starts[:, envs], states=self.states[:, :, envs]
        )

    def _select(self, pick: Callable[[Tensor], Tensor]) -> Batch:
        """This batch with ``pick`` applied to every per-sample field."""
        fields = ("obs", "actions", "log_probs", "values", "advantages", "returns")
        return dataclasses.replace(self, **{f: pick(getattr(self, f)) for f in fields})


def evaluate(policy: ActorCritic, batch: Batch) -> tuple[Distribution, Tensor]:
    """The policy's distribution and values on a batch: per sample, or for a recurrent policy
    along its sequences from their stored states."""
    if batch.starts is None or batch.states is None:
        return policy(batch.obs)
    return policy.sequence(batch.obs, batch.states, batch.starts)


class RolloutCollector:
    """Steps a vector env with the current policy and returns flattened batches."""

    def __init__(
        self,
        envs: VectorEnv,
        policy: ActorCritic,
        n_steps: int,
        gamma: float,
        gae_lambda: float,
        normalizer: Normalizer,
        device: torch.device,
        seed: int,
    ) -> None:
        self.envs, self.policy, self.normalizer = envs, policy, normalizer
        self.n_steps, self.gamma, self.gae_lambda, self.device = n_steps, gamma, gae_lambda, device
        self.n_envs = envs.num_envs
        obs_space = envs.single_observation_space
        assert obs_space.shape is not None
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
        self.head = policy.head
        t, e = n_steps, self.n_envs
        self.obs = torch.zeros((t, e, *obs_space.shape), dtype=obs_dtype, device=device)
        self.actions = torch.zeros((t, e, *self.head.shape), dtype=self.head.dtype, device=device)
        self.log_probs = torch.zeros((t, e), device=device)
        self.values = torch.zeros((t, e), device=device)
        self.bootstrap = torch.zeros((t, e), device=device)  # V(final obs) at truncations
        # a recurrent policy's state, and whether each env's next step begins an episode
        self.state = policy.initial_state(e)
        self.starts = torch.zeros((t, e), dtype=torch.bool, device=device)
        self.episode_start = torch.ones(e, dtype=torch.bool, device=device)
        self.rewards = np.zeros((t, e), np.float32)
        self.ends = np.zeros((t, e), np.bool_)
        self.episode_returns: deque[float] = deque(maxlen=100)
        self.episode_lengths: deque[int] = deque(maxlen=100)
        self.finished: list[tuple[int, float, int]] = []  # (timestep, return, length), drained
        self.timesteps = 0
        self.nonfinite_inputs = 0  # environment steps whose observations or rewards had NaN/inf
        self._warned: set[str] = set()
        raw, _ = envs.reset(seed=seed)
        raw = self._finite(raw, "observations")
        # not added to the statistics: a resumed run starts from exactly the saved ones
        self.next_obs = self._to_device(self.normalizer.observations(raw, update=False))

    def __repr__(self) -> str:
        return (
            f"RolloutCollector(n_envs={self.n_envs}, n_steps={self.n_steps}, gamma={self.gamma}, "
            f"gae_lambda={self.gae_lambda}, device={self.device}, timesteps={self.timesteps})"
        )

    def _to_device(self, obs: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(obs)).to(self.device, self.obs.dtype)

    @torch.no_grad()
    def collect(self) -> Batch:
        """Step ``n_steps`` times; the batch views this collector's buffers (see :class:`Batch`)."""
        self.bootstrap.zero_()
        recurrent = self.policy.recurrent
        first_state = self.state
        for t in range(self.n_steps):
            obs = self.next_obs
            self.obs[t] = obs
            if recurrent:
                self.starts[t] = self.episode_start
            dist, value, state = self._act(obs)
            action = dist.sample()
            self.actions[t] = action
            self.log_probs[t] = dist.log_prob(action)
            self.values[t] = value
            raw, reward, terminated, truncated, info = self.envs.step(self.head.to_env(action))
            raw, reward = self._finite(raw, "observations"), self._finite(reward, "rewards")
            self.timesteps += self.n_envs
            ends = terminated | truncated
            self._record_episodes(info)
            self.rewards[t] = self.normalizer.rewards(reward.astype(np.float64), ends)
            self.ends[t] = ends
            cut = np.flatnonzero(truncated & ~terminated)
            if cut.size:
                raw_final = np.stack([info["final_obs"][i] for i in cut])
                raw_final = self._finite(raw_final, "observations")
                final = self._to_device(self.normalizer.observations(raw_final, update=False))
                index = torch.as_tensor(cut, device=self.device)
                if recurrent:  # the final observation follows this step: the state after it
                    none = torch.zeros(len(cut), dtype=torch.bool, device=self.device)
                    final_values = self.policy.step(final, state[:, :, index], none)[1]
                else:
                    final_values = self.policy(final)[1]
                self.bootstrap[t, index] = final_values
            self.next_obs = self._to_device(self.normalizer.observations(raw))
            if recurrent:  # the episode-start flags: a second copy per step, for them only
                self.state = state
                self.episode_start = torch.from_numpy(ends).to(self.device)
        last_values = self._act(self.next_obs)[1]
        host = torch.from_numpy(np.stack([self.rewards, self.ends.astype(np.float32)]))
        rewards, ends = host.to(self.device).unbind(0)
        rewards = rewards + self.gamma * self.bootstrap
        advantages, returns = compute_gae(
            rewards, self.values, ends, last_values, self.gamma, self.gae_lambda
        )
        n = self.n_steps * self.n_envs
        return Batch(
            obs=self.obs.reshape(n, *self.obs.shape[2:]),
            actions=self.actions.reshape(n, *self.actions.shape[2:]),
            log_probs=self.log_probs.reshape(n),
            values=self.values.reshape(n),
            advantages=advantages.reshape(n),
            returns=returns.reshape(n),
            starts=self.starts if recurrent else None,
            states=first_state if recurrent else None,
        )

    def _act(self, obs: Tensor) -> tuple[Distribution, Tensor, Tensor]:
        """The policy at ``obs``, and the state after this step (recurrent policies)."""
        if self.policy.recurrent:
            return self.policy.step(obs, self.state, self.episode_start)
        dist, value = self.policy(obs)
        return dist, value, self.state

    def _finite(self, x: np.ndarray, what: str) -> np.ndarray:
        """``x`` with NaN/±inf entries set to 0 (counted in :attr:`nonfinite_inputs`, warned
        once): they would otherwise poison the normaliser's statistics and every later step."""
        if x.dtype.kind != "f" or np.isfinite(x).all():
            return x
        self.nonfinite_inputs += 1
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(
                f"the environment returned non-finite {what}; they are replaced by 0 "
                "(counted in rollout/nonfinite_inputs)",
                RuntimeWarning,
                stacklevel=3,
            )
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    def _record_episodes(self, info: dict) -> None:
        for r, length in finished_episodes(info):
            self.episode_returns.append(r)
            self.episode_lengths.append(length)
            self.finished.append((self.timesteps, r, length))
