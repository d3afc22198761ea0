"""ACKTR and PPO-KFAC as Stable-Baselines3 algorithms, built on SB3's own A2C and PPO.

SB3's training loops run unchanged: the K-FAC policies record true-Fisher statistics in the
training forward, SB3 back-propagates its loss, clips the gradient norm and calls
``optimizer.step()``, where K-FAC preconditions and applies the trust-region clip. Around each
``train()`` these classes add KL-based damping and log the K-FAC diagnostics (``kfac/*``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import numpy as np
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import obs_as_tensor

from rl_kfac.actor_critic import adapt_damping_to_kl
from rl_kfac.damping import KLDampingController
from rl_kfac.diagnostics import log_diagnostics
from rl_kfac.optimizer import KFAC
from rl_kfac.sb3.policies import KFACActorCriticCnnPolicy, KFACActorCriticPolicy, distribution_kl

_POLICIES: dict[str, type[BasePolicy]] = {
    "MlpPolicy": KFACActorCriticPolicy,
    "CnnPolicy": KFACActorCriticCnnPolicy,
}
_KL_CHUNK = 4096  # states per no-grad forward when measuring the update's KL


class _KFACTraining:
    """What ACKTR and PPOKFAC add to SB3's A2C / PPO (a mixin placed before them)."""

    policy: Any  # ActorCriticPolicy in OnPolicyAlgorithm, BasePolicy in BaseAlgorithm
    rollout_buffer: RolloutBuffer
    logger: Any
    policy_class: type[BasePolicy]
    kl_damping: KLDampingController | None

    @staticmethod
    def _kfac_policy_kwargs(
        policy_kwargs: dict[str, Any] | None, vf_fisher_coef: float, **kfac: Any
    ) -> dict[str, Any]:
        """SB3 ``policy_kwargs`` with the K-FAC arguments merged into ``optimizer_kwargs``."""
        out = dict(policy_kwargs or {})
        extra = dict(out.get("optimizer_kwargs") or {})
        both = sorted(set(extra) & set(kfac))
        if both:
            raise ValueError(f"{both} given both as arguments and in optimizer_kwargs")
        out["optimizer_kwargs"] = {**kfac, **extra}
        out.setdefault("vf_fisher_coef", vf_fisher_coef)
        return out

    def _check_kfac_setup(
        self, damping_target_kl: float | None, damping_kwargs: dict[str, Any] | None
    ) -> None:
        if not issubclass(self.policy_class, KFACActorCriticPolicy):
            raise ValueError(
                f"{type(self).__name__} needs a K-FAC policy ('MlpPolicy', 'CnnPolicy' or a "
                f"KFACActorCriticPolicy subclass), got {self.policy_class.__name__}"
            )
        if damping_target_kl is None and damping_kwargs:
            raise ValueError("damping_kwargs need damping_target_kl")
        self.kl_damping = (
            None
            if damping_target_kl is None
            else KLDampingController(damping_target_kl, **(damping_kwargs or {}))
        )

    @contextmanager
    def _kfac_update(self) -> Iterator[None]:
        """Around SB3's ``train()``: measure KL(π_old ‖ π_new), adapt damping, log ``kfac/*``."""
        optimizer = cast(KFAC, self.policy.optimizer)
        states, old = None, None
        if self.kl_damping is not None:
            states = self._rollout_states()
            old = self._distributions(states)
        yield
        if states is not None and old is not None and self.kl_damping is not None:
            new = self._distributions(states)
            kl = float(torch.cat([distribution_kl(p, q) for p, q in zip(old, new)]).mean())
            adapt_damping_to_kl(optimizer, self.kl_damping, kl)
            self.logger.record("kfac/kl", kl)
        log_diagnostics(optimizer.diagnostics, self.logger.record)

    def _rollout_states(self) -> list[Any]:
        """The rollout's observations as tensors, in chunks (copies: SB3 reshuffles the buffer)."""
        shape = self.policy.observation_space.shape or ()
        flat = np.asarray(self.rollout_buffer.observations).reshape(-1, *shape)
        device = self.policy.device
        return [
            obs_as_tensor(flat[i : i + _KL_CHUNK], device) for i in range(0, len(flat), _KL_CHUNK)
        ]

    @torch.no_grad()
    def _distributions(self, states: list[Any]) -> list[Distribution]:
        # SB3 policies return their one distribution object, re-filled on every call: keep copies
        return [copy.copy(self.policy.get_distribution(s)) for s in states]


class ACKTR(_KFACTraining, A2C):
    """ACKTR (Wu et al. 2017): SB3's A2C with the K-FAC natural gradient and trust-region clip.

    Defaults follow the paper and OpenAI baselines' ACKTR: lr 0.25, 20-step rollouts, n-step
    returns (``gae_lambda=1``), ``ent_coef`` 0.01, K-FAC with momentum 0.9, damping 0.01,
    ``kl_clip`` 0.001, statistics every update and eigendecompositions every 10.

    K-FAC arguments (see :class:`rl_kfac.KFAC`): ``kl_clip``, ``damping``, ``momentum``,
    ``stat_decay``, ``factor_update_interval``, ``inverse_update_interval``; others
    (``damping_mode``, ``conv_approx``, ``weight_decay``, ``factor_dtype``) go in
    ``policy_kwargs["optimizer_kwargs"]``. ``vf_fisher_coef`` weighs the value head in the Fisher.
    ``damping_target_kl``: if set, the damping λ moves toward this KL(π_old ‖ π_new) after each
    update (:class:`rl_kfac.damping.KLDampingController`, options in ``damping_kwargs``).

    ``max_grad_norm`` defaults to ``inf``: while the trust region binds, clipping the gradient
    norm first does not change the step (the clip rescales ``g``, ``ν`` undoes it).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = _POLICIES

    def __init__(
        self,
        policy: str | type[KFACActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.5,
        max_grad_norm: float = math.inf,
        normalize_advantage: bool = False,
        kl_clip: float | None = 1e-3,
        damping: float = 1e-2,
        momentum: float = 0.9,
        stat_decay: float = 0.99,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        vf_fisher_coef: float = 1.0,
        damping_target_kl: float | None = None,
        damping_kwargs: dict[str, Any] | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        policy_kwargs = self._kfac_policy_kwargs(
            policy_kwargs,
            vf_fisher_coef,
            kl_clip=kl_clip,
            damping=damping,
            momentum=momentum,
            stat_decay=stat_decay,
            factor_update_interval=factor_update_interval,
            inverse_update_interval=inverse_update_interval,
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_rms_prop=False,
            normalize_advantage=normalize_advantage,
            policy_kwargs=policy_kwargs,
            _init_setup_model=False,
            **kwargs,
        )
        self._check_kfac_setup(damping_target_kl, damping_kwargs)
        if _init_setup_model:
            self._setup_model()

    def train(self) -> None:
        with self._kfac_update():
            super().train()


class PPOKFAC(_KFACTraining, PPO):
    """PPO whose minibatch steps are K-FAC steps (Song & Wu 2018), on SB3's PPO.

    Each minibatch records true-Fisher statistics from the current policy, then takes one
    trust-region-clipped K-FAC step on SB3's clipped-surrogate loss. Defaults come from this
    project's measurements (README): few epochs of large minibatches, lr 0.25, ``kl_clip`` 0.01,
    momentum 0 and KL-based damping toward 0.003. Arguments as :class:`ACKTR` and SB3's PPO.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = _POLICIES

    def __init__(
        self,
        policy: str | type[KFACActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 256,
        batch_size: int = 256,
        n_epochs: int = 4,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = math.inf,
        target_kl: float | None = None,
        kl_clip: float | None = 1e-2,
        damping: float = 1e-2,
        momentum: float = 0.0,
        stat_decay: float = 0.99,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        vf_fisher_coef: float = 1.0,
        damping_target_kl: float | None = 0.003,
        damping_kwargs: dict[str, Any] | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        policy_kwargs = self._kfac_policy_kwargs(
            policy_kwargs,
            vf_fisher_coef,
            kl_clip=kl_clip,
            damping=damping,
            momentum=momentum,
            stat_decay=stat_decay,
            factor_update_interval=factor_update_interval,
            inverse_update_interval=inverse_update_interval,
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            target_kl=target_kl,
            policy_kwargs=policy_kwargs,
            _init_setup_model=False,
            **kwargs,
        )
        self._check_kfac_setup(damping_target_kl, damping_kwargs)
        if _init_setup_model:
            self._setup_model()

    def train(self) -> None:
        with self._kfac_update():
            super().train()
