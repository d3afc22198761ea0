"""Recurrent PPO-KFAC on sb3-contrib's ``RecurrentPPO``: LSTM policies with true-Fisher K-FAC.

sb3-contrib's training loop runs unchanged. Its LSTMs are K-FAC blocks (:mod:`rl_kfac.recurrent`:
the input and recurrent weights of each layer, shared across the steps of a sequence), and the
policies here record the statistics ACKTR uses from sb3-contrib's training forward: the NLL of
actions sampled from the policy over the stored sequences, plus the value head's Gauss-Newton
term. sb3-contrib pads sequences to equal length and masks the padding out of its loss; the
Fisher loss leaves the padded steps out too (so they add nothing to G), but they are rows of A,
and the factors' scales count all rows: the curvature is scaled by the real steps' share.

Plain ``RecurrentPPO`` can take :class:`rl_kfac.KFAC` as its optimizer too (empirical Fisher,
``optimizer_kwargs=dict(statistics="empirical")``), as any SB3 algorithm can.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import (
    RecurrentActorCriticCnnPolicy,
    RecurrentActorCriticPolicy,
    RecurrentMultiInputActorCriticPolicy,
)
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import obs_as_tensor
from torch import Tensor

from rl_kfac.sb3.algorithms import PPOKFAC, _KFACTraining
from rl_kfac.sb3.policies import KFACPolicySetup


class KFACRecurrentActorCriticPolicy(KFACPolicySetup, RecurrentActorCriticPolicy):
    """``MlpLstmPolicy`` of :class:`RecurrentPPOKFAC`: sb3-contrib's LSTM policy (same networks
    and arguments, ``lstm_hidden_size`` 256 by default) plus ``vf_fisher_coef``, with K-FAC
    built on the policy module (Linear layers and both LSTMs are blocks)."""

    _last_distribution: Distribution | None = None
    _rows: Tensor | None = None  # the minibatch's real (not padded) steps

    @contextmanager
    def real_steps(self, mask: Tensor) -> Iterator[None]:
        """Inside: training forwards are of a minibatch whose real steps ``mask`` marks."""
        self._rows = mask
        try:
            yield
        finally:
            self._rows = None

    def _get_action_dist_from_latent(self, latent_pi: Tensor) -> Distribution:
        # kept for evaluate_actions, which returns log-probabilities but not the distribution
        self._last_distribution = super()._get_action_dist_from_latent(latent_pi)
        return self._last_distribution

    def evaluate_actions(  # type: ignore[override]  # sb3-contrib's signature
        self, obs: Tensor, actions: Tensor, lstm_states: Any, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """sb3-contrib's training forward; then the statistics from it when they are due."""
        values, log_prob, entropy = super().evaluate_actions(
            obs, actions, lstm_states, episode_starts
        )
        assert self._last_distribution is not None
        self.record_statistics(self._last_distribution, values, self._rows)
        self.guard_next_step(
            self._last_distribution,
            lambda: self.get_distribution(obs, lstm_states.pi, episode_starts)[0],
            self._rows,
        )
        self._last_distribution = None
        return values, log_prob, entropy


class KFACRecurrentActorCriticCnnPolicy(
    KFACRecurrentActorCriticPolicy, RecurrentActorCriticCnnPolicy
):
    """``CnnLstmPolicy``: a Nature CNN under the LSTM."""


class KFACRecurrentMultiInputActorCriticPolicy(
    KFACRecurrentActorCriticPolicy, RecurrentMultiInputActorCriticPolicy
):
    """``MultiInputLstmPolicy`` (Dict observations)."""


_POLICIES: dict[str, type[BasePolicy]] = {
    "MlpLstmPolicy": KFACRecurrentActorCriticPolicy,
    "CnnLstmPolicy": KFACRecurrentActorCriticCnnPolicy,
    "MultiInputLstmPolicy": KFACRecurrentMultiInputActorCriticPolicy,
}
_KL_CHUNK = 4096


class RecurrentPPOKFAC(_KFACTraining, RecurrentPPO):
    """sb3-contrib's ``RecurrentPPO`` whose minibatch steps are true-Fisher K-FAC steps.

    ``RecurrentPPOKFAC(policy, env, **kwargs)`` takes ``RecurrentPPO``'s arguments and the K-FAC
    ones of :class:`~rl_kfac.sb3.ACKTR`; defaults as :class:`~rl_kfac.sb3.PPOKFAC`'s with
    ``RecurrentPPO``'s 128-step rollouts in minibatches of 128 steps (whole padded sequences).
    With ``damping_target_kl`` the KL(π_old ‖ π_new) that adapts λ is measured on each
    environment's stored sequence, replayed from the LSTM state the rollout stored at its start,
    before and after the update (as our agents measure it).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = _POLICIES
    defaults: ClassVar[dict[str, Any]] = {**PPOKFAC.defaults, "n_steps": 128, "batch_size": 128}

    def train(self) -> None:
        """sb3-contrib's ``train()``; each minibatch's padding mask reaches the policy, so that
        its Fisher loss covers the real steps only."""
        buffer = self.rollout_buffer
        get = buffer.get

        def minibatches(batch_size: int | None = None) -> Iterator[Any]:
            for data in get(batch_size):
                with self.policy.real_steps(data.mask > 1e-8):  # type: ignore[attr-defined]
                    yield data

        buffer.get = minibatches  # type: ignore[method-assign,assignment]  # this train() only
        try:
            super().train()
        finally:
            del buffer.get

    def _rollout_states(self) -> list[Any]:
        """Each environment's stored sequence with the actor LSTM's state at its first step
        and the episode starts, in chunks of environments (copies): replayed whole, so that the
        KL sees the hidden states the updated weights produce."""
        buffer = self.rollout_buffer
        steps, n_envs = buffer.buffer_size, buffer.n_envs

        def by_env(x: Any, envs: slice) -> np.ndarray:  # (steps, envs, ...) -> (envs·steps, ...)
            x = np.asarray(x)[:, envs]
            return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

        device = self.policy.device
        chunks = []
        per_chunk = max(1, _KL_CHUNK // steps)
        for i in range(0, n_envs, per_chunk):
            envs = slice(i, i + per_chunk)
            stored = buffer.observations
            obs = (
                {k: by_env(v, envs) for k, v in stored.items()}
                if isinstance(stored, dict)
                else by_env(stored, envs)
            )
            first = (  # (steps, layers, envs, hidden) at step 0
                torch.as_tensor(np.asarray(x)[0][:, envs], device=device)
                for x in (buffer.hidden_states_pi, buffer.cell_states_pi)  # type: ignore[attr-defined]
            )
            starts = torch.as_tensor(by_env(buffer.episode_starts, envs), device=device)
            chunks.append((obs_as_tensor(obs, device), tuple(first), starts))
        return chunks

    @torch.no_grad()
    def _distributions(self, states: list[Any]) -> list[Distribution]:
        return [
            copy.copy(self.policy.get_distribution(obs, state, starts)[0])
            for obs, state, starts in states
        ]
