"""Recurrent PPO-KFAC on sb3-contrib's ``RecurrentPPO``: LSTM policies with true-Fisher K-FAC.

sb3-contrib's training loop runs unchanged. Its LSTMs are K-FAC blocks (:mod:`rl_kfac.recurrent`:
the input and recurrent weights of each layer, shared across the steps of a sequence), and the
policies here record the statistics ACKTR uses from sb3-contrib's training forward: the NLL of
actions sampled from the policy over the stored sequences, plus the value head's Gauss-Newton
term. sb3-contrib pads sequences to equal length and masks the padding out of its loss; the
padded steps get no gradient, so they add nothing to G but count as rows of A.

Plain ``RecurrentPPO`` can take :class:`rl_kfac.KFAC` as its optimizer too (empirical Fisher,
``optimizer_kwargs=dict(statistics="empirical")``), as any SB3 algorithm can.
"""

from __future__ import annotations

import copy
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
        self.record_statistics(self._last_distribution, values)
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
    With ``damping_target_kl`` the KL(π_old ‖ π_new) that adapts λ is measured step by step from
    the LSTM states the rollout stored, before and after the update.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = _POLICIES
    defaults: ClassVar[dict[str, Any]] = {**PPOKFAC.defaults, "n_steps": 128, "batch_size": 128}

    def _rollout_states(self) -> list[Any]:
        """Every stored step as its own one-step sequence: observation, the actor LSTM's state
        before it, and whether it began an episode (chunks; copies)."""
        buffer = self.rollout_buffer
        space = self.policy.observation_space
        n = buffer.buffer_size * buffer.n_envs
        obs = np.asarray(buffer.observations).reshape(n, *(space.shape or ()))
        # (steps, layers, envs, hidden) -> (layers, steps·envs, hidden)
        hidden, cell = (
            np.asarray(x).transpose(1, 0, 2, 3).reshape(x.shape[1], n, x.shape[3])
            for x in (buffer.hidden_states_pi, buffer.cell_states_pi)  # type: ignore[attr-defined]
        )
        starts = np.asarray(buffer.episode_starts).reshape(n)
        device = self.policy.device
        chunks = []
        for i in range(0, n, _KL_CHUNK):
            part = slice(i, i + _KL_CHUNK)
            state = (
                torch.as_tensor(hidden[:, part], device=device),
                torch.as_tensor(cell[:, part], device=device),
            )
            chunks.append(
                (
                    obs_as_tensor(obs[part], device),
                    state,
                    torch.as_tensor(starts[part], device=device),
                )
            )
        return chunks

    @torch.no_grad()
    def _distributions(self, states: list[Any]) -> list[Distribution]:
        return [
            copy.copy(self.policy.get_distribution(obs, state, starts)[0])
            for obs, state, starts in states
        ]
