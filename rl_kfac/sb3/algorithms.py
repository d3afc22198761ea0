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
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.utils import LinearSchedule, obs_as_tensor

from rl_kfac.actor_critic import adapt_damping_to_kl, adapt_kl_clip
from rl_kfac.damping import KLDampingController
from rl_kfac.diagnostics import log_diagnostics
from rl_kfac.optimizer import KFAC
from rl_kfac.sb3.policies import (
    KFACActorCriticCnnPolicy,
    KFACActorCriticPolicy,
    KFACMultiInputActorCriticPolicy,
    KFACPolicySetup,
    distribution_kl,
)
from rl_kfac.trust_region import KLClipController

_POLICIES: dict[str, type[BasePolicy]] = {
    "MlpPolicy": KFACActorCriticPolicy,
    "CnnPolicy": KFACActorCriticCnnPolicy,
    "MultiInputPolicy": KFACMultiInputActorCriticPolicy,
}
_KL_CHUNK = 4096  # states per no-grad forward when measuring the update's KL


# The arguments that go to rl_kfac.KFAC (the policy's optimizer)
KFAC_ARGS = (
    "kl_clip",
    "kl_clip_lr",
    "damping",
    "momentum",
    "stat_decay",
    "factor_update_interval",
    "inverse_update_interval",
    "kl_guard",
    "kl_guard_backtracks",
)
# The ACKTR paper's / OpenAI baselines' values (Wu et al. 2017)
PAPER: dict[str, Any] = {
    "learning_rate": 0.25,
    "n_steps": 20,
    "gamma": 0.99,
    "gae_lambda": 1.0,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": math.inf,  # the trust region bounds the step instead
    "kl_clip": 1e-3,
    "kl_clip_lr": "current",
    "damping": 1e-2,
    "momentum": 0.9,
    "stat_decay": 0.99,
    "factor_update_interval": 1,
    "inverse_update_interval": 10,
    "kl_guard": None,  # not in the paper: rl_kfac.kl_guard
    "kl_guard_backtracks": 5,
    "vf_fisher_coef": 1.0,
    "vf_kl_clip": None,  # the value shares the policy's trust region
    "damping_target_kl": None,
    "damping_kwargs": None,
    "kl_clip_target": None,
}
# What the classes add to the paper's settings, so that they learn with none given: the paper's
# linear decay of the learning rate (rl-zoo's "lin_0.25"), which under kl_clip_lr "initial"
# shortens clipped steps too; the KL guard (rl_kfac.kl_guard) at twice the trust region; and a
# trust region of its own for the value function (radius 1: an RMS change of the value
# predictions of about 1 per step): with unnormalised returns its Gauss-Newton term held
# 73-99.9 % of the shared clip's quadratic on CartPole, so the critic's error, not the policy,
# decided each policy step's length (bench_results/sb3_defaults/PROTOCOL.md, candidates E, F)
ROBUST: dict[str, Any] = {
    "learning_rate": LinearSchedule(0.25, 0.0, 1.0),
    "kl_clip_lr": "initial",
    "kl_guard": 2.0,
    "vf_kl_clip": 1.0,
}
# ACKTR from one environment (what SB3 makes from an env id): the paper's 20 steps are per
# environment of 16-32, a 20-sample batch from one; these are what our tuned CartPole config and
# PPOKFAC's defaults share (candidate F)
ONE_ENV: dict[str, Any] = {
    "n_steps": 128,
    "kl_clip": 1e-2,
    "momentum": 0.0,
    "gae_lambda": 0.95,
    "ent_coef": 0.0,
}


if TYPE_CHECKING:  # the mixin is placed before A2C / PPO, whose methods it extends
    _Algorithm = OnPolicyAlgorithm
else:
    _Algorithm = object


class _KFACTraining(_Algorithm):
    """What ACKTR and PPOKFAC add to SB3's A2C / PPO (a mixin placed before them).

    Every keyword argument has its default in the class's ``defaults`` (SB3's and K-FAC's
    together, so that tests can check them against ``configs/``); the K-FAC ones go to the
    policy's optimizer, the rest to SB3. Around SB3's ``train()``: KL-based damping and the
    ``kfac/*`` diagnostics.
    """

    defaults: ClassVar[dict[str, Any]]
    forced: ClassVar[dict[str, Any]] = {}  # SB3 arguments K-FAC needs at one value
    policy: Any  # ActorCriticPolicy in OnPolicyAlgorithm, BasePolicy in BaseAlgorithm
    rollout_buffer: RolloutBuffer
    logger: Any
    policy_class: type[BasePolicy]
    policy_aliases: ClassVar[dict[str, type[BasePolicy]]]
    kl_damping: KLDampingController | None
    kl_clip_control: KLClipController | None

    def __init__(
        self,
        policy: str | type[KFACActorCriticPolicy],
        env: GymEnv | str,
        *,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        forced = sorted(k for k, v in self.forced.items() if kwargs.get(k, v) != v)
        if forced:
            raise ValueError(f"{type(self).__name__} needs {forced} at {self.forced}")
        args = {**self.defaults, **kwargs, **self.forced}
        kfac = {k: args.pop(k) for k in KFAC_ARGS}
        target_kl, damping_kwargs = args.pop("damping_target_kl"), args.pop("damping_kwargs")
        kl_clip_target = args.pop("kl_clip_target")
        args["policy_kwargs"] = self._kfac_policy_kwargs(
            args.pop("policy_kwargs", None),
            {k: args.pop(k) for k in ("vf_fisher_coef", "vf_kl_clip")},
            **kfac,
        )
        super().__init__(policy, env, _init_setup_model=False, **args)
        self._check_kfac_setup(target_kl, damping_kwargs, kl_clip_target, kfac["kl_clip"])
        if _init_setup_model:
            self._setup_model()

    def train(self) -> None:
        with self._kfac_update():
            super().train()

    def learn(self, *args: Any, **kwargs: Any) -> Any:
        """SB3's ``learn``; TensorBoard runs are named after this class (``ACKTR_1``), not the
        base class, unless ``tb_log_name`` is given."""
        if len(args) < 4:  # learn(total_timesteps, callback, log_interval, tb_log_name, ...)
            kwargs.setdefault("tb_log_name", type(self).__name__)
        return super().learn(*args, **kwargs)

    def __repr__(self) -> str:
        policy = getattr(self, "policy", None)
        optimizer = getattr(policy, "optimizer", None)
        return (
            f"{type(self).__name__}(n_envs={self.n_envs}, n_steps={self.n_steps}, "
            f"num_timesteps={self.num_timesteps}, optimizer={optimizer})"
        )

    @staticmethod
    def _kfac_policy_kwargs(
        policy_kwargs: dict[str, Any] | None, value: dict[str, Any], **kfac: Any
    ) -> dict[str, Any]:
        """SB3 ``policy_kwargs`` with the K-FAC arguments merged into ``optimizer_kwargs``."""
        out = dict(policy_kwargs or {})
        extra = dict(out.get("optimizer_kwargs") or {})
        both = sorted(set(extra) & set(kfac))
        if both:
            raise ValueError(f"{both} given both as arguments and in optimizer_kwargs")
        out["optimizer_kwargs"] = {**kfac, **extra}
        for key, setting in value.items():
            out.setdefault(key, setting)
        return out

    def _check_kfac_setup(
        self,
        damping_target_kl: float | None,
        damping_kwargs: dict[str, Any] | None,
        kl_clip_target: float | None,
        kl_clip: float | None,
    ) -> None:
        if not issubclass(self.policy_class, KFACPolicySetup):
            names = ", ".join(f"'{n}'" for n in self.policy_aliases)
            raise ValueError(
                f"{type(self).__name__} needs a K-FAC policy ({names} or a subclass of "
                f"rl_kfac.sb3's policies), got {self.policy_class.__name__}"
            )
        if damping_target_kl is None and damping_kwargs:
            raise ValueError("damping_kwargs need damping_target_kl")
        self.kl_damping = (
            None
            if damping_target_kl is None
            else KLDampingController(damping_target_kl, **(damping_kwargs or {}))
        )
        self.kl_clip_control = None
        if kl_clip_target is not None:
            if kl_clip is None:
                raise ValueError("kl_clip_target needs a kl_clip to adapt")
            self.kl_clip_control = KLClipController(kl_clip_target, kl_clip)

    @contextmanager
    def _kfac_update(self) -> Iterator[None]:
        """Around SB3's ``train()``: measure KL(π_old ‖ π_new), adapt damping and the
        trust-region radius, log ``kfac/*``."""
        optimizer = cast(KFAC, self.policy.optimizer)
        states, old = None, None
        if self.kl_damping is not None or self.kl_clip_control is not None:
            states = self._rollout_states()
            old = self._distributions(states)
        yield
        if states is not None and old is not None:
            new = self._distributions(states)
            kl = float(torch.cat([distribution_kl(p, q) for p, q in zip(old, new)]).mean())
            if self.kl_damping is not None:
                adapt_damping_to_kl(optimizer, self.kl_damping, kl, self.lr_schedule(1.0))
            if self.kl_clip_control is not None:
                self.logger.record(
                    "kfac/kl_clip", adapt_kl_clip(optimizer, self.kl_clip_control, kl)
                )
            self.logger.record("kfac/kl", kl)
        log_diagnostics(optimizer.diagnostics, self.logger.record)

    def _rollout_states(self) -> list[Any]:
        """The rollout's observations as tensors (dicts of them for Dict observations), in
        chunks (copies: SB3 reshuffles the buffer)."""
        space = self.policy.observation_space
        stored = self.rollout_buffer.observations
        if isinstance(stored, dict):
            assert isinstance(space, spaces.Dict)
            flat: Any = {
                k: np.asarray(v).reshape(-1, *(space[k].shape or ())) for k, v in stored.items()
            }
            n = len(next(iter(flat.values())))
        else:
            flat = np.asarray(stored).reshape(-1, *(space.shape or ()))
            n = len(flat)
        device = self.policy.device

        def chunk(i: int) -> Any:
            if isinstance(flat, dict):
                return {k: v[i : i + _KL_CHUNK] for k, v in flat.items()}
            return flat[i : i + _KL_CHUNK]

        return [obs_as_tensor(chunk(i), device) for i in range(0, n, _KL_CHUNK)]

    @torch.no_grad()
    def _distributions(self, states: list[Any]) -> list[Distribution]:
        # SB3 policies return their one distribution object, re-filled on every call: keep copies
        return [copy.copy(self.policy.get_distribution(s)) for s in states]


class ACKTR(_KFACTraining, A2C):
    """ACKTR (Wu et al. 2017): SB3's A2C with the K-FAC natural gradient and trust-region clip.

    ``ACKTR(policy, env, **kwargs)`` takes SB3 A2C's arguments and K-FAC's. Defaults
    (``ACKTR.defaults``) are made to learn from the one environment SB3 makes from an env id,
    with no settings given (``bench_results/sb3_defaults/``): the paper's (``PAPER``, as
    ``agents.config.Config``'s; a test checks) with ``ROBUST`` (lr 0.25 decaying linearly to 0,
    the clip at the initial lr, the KL guard at 2, the value function in a trust region of its
    own) and ``ONE_ENV`` (128-step rollouts, ``kl_clip`` 0.01, momentum 0, ``gae_lambda`` 0.95,
    no entropy bonus). ``ACKTR(..., **PAPER)`` is the paper's ACKTR (for 16-32 environments).
    Tuned settings per task: ``configs/zoo/acktr.yml`` (generated from ``configs/acktr/``).

    K-FAC arguments (see :class:`rl_kfac.KFAC`): ``kl_clip``, ``kl_clip_lr``, ``kl_guard``,
    ``kl_guard_backtracks``, ``damping``, ``momentum``, ``stat_decay``,
    ``factor_update_interval``, ``inverse_update_interval``; others
    (``damping_mode``, ``conv_approx``, ``weight_decay``, ``factor_dtype``) go in
    ``policy_kwargs["optimizer_kwargs"]``. ``vf_fisher_coef`` weighs the value head in the Fisher;
    ``vf_kl_clip`` gives the parameters only the value uses a trust region of that radius
    (``inf``: unclipped; ``None``: they share the policy's).
    ``damping_target_kl``: if set, the damping λ moves toward this KL(π_old ‖ π_new) after each
    update (:class:`rl_kfac.damping.KLDampingController`, options in ``damping_kwargs``).
    ``kl_clip_target``: if set, the trust-region radius ``kl_clip`` moves toward this measured
    KL after each update (:class:`rl_kfac.trust_region.KLClipController`).

    ``max_grad_norm`` defaults to ``inf``: while the trust region binds, clipping the gradient
    norm first does not change the step (the clip rescales ``g``, ``ν`` undoes it).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = _POLICIES
    defaults: ClassVar[dict[str, Any]] = {
        **PAPER,
        **ROBUST,
        **ONE_ENV,
        "normalize_advantage": False,
    }
    forced: ClassVar[dict[str, Any]] = {"use_rms_prop": False}  # the optimizer is K-FAC


class PPOKFAC(_KFACTraining, PPO):
    """PPO whose minibatch steps are K-FAC steps (Song & Wu 2018), on SB3's PPO.

    Each minibatch records true-Fisher statistics from the current policy, then takes one
    trust-region-clipped K-FAC step on SB3's clipped-surrogate loss. ``PPOKFAC(policy, env,
    **kwargs)`` takes SB3 PPO's arguments and the K-FAC ones of :class:`ACKTR`. Defaults
    (``PPOKFAC.defaults``): those of ``configs/ppo_kfac/hopper.yaml`` with KL damping in place
    of its fixed damping and ``kl_clip_target`` 0.02 (a test checks), a setting for continuous
    control: 256-step rollouts in minibatches of 256, 4 epochs, ``gae_lambda`` 0.95, no entropy
    bonus, ``kl_clip`` 0.01, momentum 0 and KL-based damping toward 0.003; with ``ROBUST`` (see
    :class:`ACKTR`: lr 0.25 decaying linearly, the KL guard, the critic's own trust region).
    Tuned settings per task: ``configs/zoo/ppo_kfac.yml`` (generated from ``configs/ppo_kfac/``).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = _POLICIES
    defaults: ClassVar[dict[str, Any]] = {
        **PAPER,
        **ROBUST,
        "n_steps": 256,
        "batch_size": 256,
        "n_epochs": 4,
        "gae_lambda": 0.95,
        "clip_range": 0.2,
        "clip_range_vf": None,
        "normalize_advantage": True,
        "ent_coef": 0.0,
        "target_kl": None,
        "kl_clip": 1e-2,
        "momentum": 0.0,
        "damping_target_kl": 0.003,
    }
