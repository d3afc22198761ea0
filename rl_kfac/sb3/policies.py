"""Stable-Baselines3 actor-critic policies whose optimizer is K-FAC with true-Fisher statistics.

SB3's own policies can use :class:`~rl_kfac.KFAC` as a drop-in ``optimizer_class`` (empirical
Fisher, from the training loss). These policies instead record the statistics ACKTR uses (Wu et
al. 2017, §3.1): during SB3's training forward (``evaluate_actions`` with autograd on) they back-
propagate the sampled-Fisher loss of :mod:`rl_kfac.fisher`, i.e. the NLL of actions sampled from
the policy itself plus ``vf_fisher_coef`` times the value head's Gauss-Newton term, through
:meth:`KFAC.fisher_backward`. Rollout forwards run under ``torch.no_grad()`` and record nothing.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor

from rl_kfac.actor_critic import kfac_param_groups, record_fisher
from rl_kfac.fisher import bernoulli_fisher_loss, categorical_fisher_loss, gaussian_fisher_loss
from rl_kfac.optimizer import KFAC

# parameter-name prefixes of what only the value uses, in SB3's and sb3-contrib's policies
VALUE_ONLY = (
    "mlp_extractor.value_net.",
    "value_net.",
    "vf_features_extractor.",
    "lstm_critic.",
    "critic.",
)
SUPPORTED_ACTION_SPACES = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary, spaces.Box)


def policy_fisher_loss(distribution: Distribution, rows: Tensor | None = None) -> Tensor:
    """Sampled-Fisher loss of an SB3 Categorical, MultiCategorical, Bernoulli or DiagGaussian
    distribution, over all its rows or the ``rows`` a boolean mask selects."""

    def pick(x: Tensor) -> Tensor:
        return x if rows is None else x[rows]

    if isinstance(distribution, CategoricalDistribution):
        return categorical_fisher_loss(pick(distribution.distribution.logits))
    if isinstance(distribution, MultiCategoricalDistribution):
        # independent sub-actions: the Fisher is block-diagonal, the losses add
        parts = distribution.distribution
        return torch.stack([categorical_fisher_loss(pick(d.logits)) for d in parts]).sum()
    if isinstance(distribution, BernoulliDistribution):
        return bernoulli_fisher_loss(pick(distribution.distribution.logits))
    if isinstance(distribution, DiagGaussianDistribution):
        normal = distribution.distribution
        mean = pick(normal.mean)
        return gaussian_fisher_loss(mean, pick(normal.scale.expand_as(normal.mean)).log())
    raise ValueError(f"no K-FAC Fisher loss for {type(distribution).__name__}")


def distribution_kl(old: Distribution, new: Distribution) -> Tensor:
    """Per-state KL(old ‖ new) between two SB3 distributions of the same kind."""
    if isinstance(old, MultiCategoricalDistribution):
        pairs = zip(old.distribution, new.distribution)  # type: ignore[arg-type]
        return torch.stack([torch.distributions.kl_divergence(p, q) for p, q in pairs]).sum(0)
    kl = torch.distributions.kl_divergence(old.distribution, new.distribution)  # type: ignore[arg-type]
    independent = isinstance(old, (DiagGaussianDistribution, BernoulliDistribution))
    return kl.sum(-1) if independent else kl


def frozen_copy(distribution: Distribution) -> Distribution:
    """A copy of an SB3 distribution with its parameters detached (SB3 re-fills a policy's one
    distribution object on every forward, so the policy before a step needs its own)."""
    d = distribution.distribution
    frozen = copy.copy(distribution)
    if isinstance(distribution, MultiCategoricalDistribution):
        assert isinstance(d, list)
        logits = [c.logits.detach() for c in d if isinstance(c, torch.distributions.Categorical)]
        frozen.distribution = [torch.distributions.Categorical(logits=z) for z in logits]
    elif isinstance(distribution, DiagGaussianDistribution):
        assert isinstance(d, torch.distributions.Normal)
        frozen.distribution = torch.distributions.Normal(d.mean.detach(), d.stddev.detach())
    elif isinstance(distribution, BernoulliDistribution):
        assert isinstance(d, torch.distributions.Bernoulli)
        frozen.distribution = torch.distributions.Bernoulli(logits=d.logits.detach())
    elif isinstance(distribution, CategoricalDistribution):
        assert isinstance(d, torch.distributions.Categorical)
        frozen.distribution = torch.distributions.Categorical(logits=d.logits.detach())
    else:
        raise ValueError(f"no KL guard for {type(distribution).__name__}")
    return frozen


class KFACPolicySetup:
    """What every K-FAC policy adds to its SB3 policy class (a mixin placed before it): the
    arguments ``vf_fisher_coef``, ``log_std_fisher`` (the Gaussian log-std preconditioned by its
    exact Fisher, :func:`rl_kfac.actor_critic.kfac_param_groups`), ``optimizer_class`` (KFAC or a
    subclass) and ``optimizer_kwargs``, checked, and K-FAC built on the policy module itself
    (layers known up front, no discovery hook) right after SB3's networks exist. SB3's
    ``_build`` hands the optimizer a parameter iterator; it gets a placeholder SGD, replaced at
    once."""

    optimizer: torch.optim.Optimizer  # the KFAC instance (SB3's BaseModel types it so)
    optimizer_class: type[torch.optim.Optimizer]
    default_extractor: type | None = None  # SB3's features extractor of this policy kind

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        vf_fisher_coef: float = 1.0,
        vf_kl_clip: float | None = None,
        log_std_fisher: bool = False,
        optimizer_class: type[KFAC] = KFAC,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
            supported = "Discrete, MultiDiscrete, MultiBinary and Box"
            raise ValueError(f"K-FAC policies support {supported} actions, got {action_space}")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, KFAC)):
            raise ValueError(f"optimizer_class must be KFAC or a subclass, got {optimizer_class}")
        kfac_kwargs = dict(optimizer_kwargs or {})
        if kfac_kwargs.get("statistics", "explicit") != "explicit":
            raise ValueError("K-FAC policies record the true Fisher: leave statistics='explicit'")
        if vf_fisher_coef < 0:
            raise ValueError(f"vf_fisher_coef must be >= 0, got {vf_fisher_coef}")
        if vf_kl_clip is not None and not vf_kl_clip > 0:
            raise ValueError(f"vf_kl_clip must be > 0 (inf: unclipped) or None, got {vf_kl_clip}")
        self.vf_fisher_coef, self.vf_kl_clip = vf_fisher_coef, vf_kl_clip
        if self.default_extractor is not None:
            kwargs.setdefault("features_extractor_class", self.default_extractor)
        super().__init__(  # type: ignore[call-arg]  # the SB3 policy class after this mixin
            observation_space,
            action_space,
            lr_schedule,
            *args,
            optimizer_class=torch.optim.SGD,
            optimizer_kwargs={},
            **kwargs,
        )
        if getattr(self, "use_sde", False):
            raise ValueError("K-FAC policies do not support gSDE (use_sde=True)")
        self.log_std_fisher = log_std_fisher
        self.optimizer_class, self.optimizer_kwargs = optimizer_class, kfac_kwargs
        log_std = getattr(self, "log_std", None)  # SB3 has it on Gaussian policies only
        critic = self.value_parameters() if vf_kl_clip is not None else []
        groups = kfac_param_groups(self, log_std, log_std_fisher, critic, vf_kl_clip)  # type: ignore[arg-type]
        self.optimizer = optimizer_class(groups, lr=lr_schedule(1), model=self, **kfac_kwargs)  # type: ignore[arg-type]

    def value_parameters(self) -> list[Tensor]:
        """The parameters only the value depends on: the critic's own network, LSTM and
        features extractor, and the value head (SB3's and sb3-contrib's names)."""
        named = cast(torch.nn.Module, self).named_parameters()
        return [p for name, p in named if name.startswith(VALUE_ONLY)]

    @property
    def kfac(self) -> KFAC:
        """The policy's optimizer, typed."""
        return cast(KFAC, self.optimizer)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        own = super()._get_constructor_parameters()  # type: ignore[misc]
        return {
            **own,
            "vf_fisher_coef": self.vf_fisher_coef,
            "vf_kl_clip": self.vf_kl_clip,
            "log_std_fisher": self.log_std_fisher,
        }

    def record_statistics(
        self, distribution: Distribution, values: Tensor, rows: Tensor | None = None
    ) -> None:
        """K-FAC statistics from SB3's training forward, when due: the sampled-Fisher loss of
        ``distribution`` plus the value head's Gauss-Newton term (not under ``no_grad``: an
        evaluation records nothing). With ``rows`` (a boolean mask) only those rows have loss
        terms, still averaged over all rows (padding of recurrent minibatches)."""
        if torch.is_grad_enabled():
            fisher = functools.partial(policy_fisher_loss, distribution, rows)
            record_fisher(self.kfac, fisher, values, self.vf_fisher_coef, rows)

    def guard_next_step(
        self,
        distribution: Distribution,
        replay: Callable[[], Distribution],
        rows: Tensor | None = None,
    ) -> None:
        """Give K-FAC's KL guard (``kl_guard``) the KL(π before ‖ π after) of SB3's next
        ``optimizer.step()``: ``distribution`` is the training forward's, ``replay`` the same
        forward run again (after the step); ``rows`` masks the real steps of padded sequences.
        Nothing happens without the guard, or outside a training forward."""
        if self.kfac.kl_guard is None or not torch.is_grad_enabled():
            return
        before = frozen_copy(distribution)

        def kl() -> Tensor:
            per_state = distribution_kl(before, replay())
            return (per_state if rows is None else per_state[rows]).mean()

        self.kfac.check_next_step(kl)


class KFACActorCriticPolicy(KFACPolicySetup, ActorCriticPolicy):
    """``MlpPolicy`` of :class:`~rl_kfac.sb3.ACKTR` / :class:`~rl_kfac.sb3.PPOKFAC`.

    Same networks and arguments as SB3's ``ActorCriticPolicy``, plus ``vf_fisher_coef`` (weight
    of the value head's Gauss-Newton term in the Fisher loss). ``optimizer_kwargs`` go to
    :class:`~rl_kfac.KFAC`, which is built on the policy module itself (every ``nn.Linear`` /
    ``nn.Conv2d`` is a Kronecker block; the Gaussian log-std gets the plain gradient, or with
    ``log_std_fisher=True`` its exact Fisher).
    Supported action spaces: Discrete, MultiDiscrete, MultiBinary, Box (no gSDE).
    """

    def evaluate_actions(self, obs: Any, actions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """SB3's training forward (the same networks and outputs as ``ActorCriticPolicy``'s);
        records K-FAC statistics from it first when they are due."""
        features = self.extract_features(obs)
        if self.share_features_extractor:
            latent_pi, latent_vf = self.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            latent_pi = self.mlp_extractor.forward_actor(pi_features)
            latent_vf = self.mlp_extractor.forward_critic(vf_features)
        distribution = self._distribution(self.action_net(latent_pi))
        values = self.value_net(latent_vf)
        self.record_statistics(distribution, values)
        self.guard_next_step(distribution, lambda: self.get_distribution(obs))
        return values, distribution.log_prob(actions), distribution.entropy()

    def _distribution(self, action_net_output: Tensor) -> Distribution:
        """The action distribution from the action head's output (means, or logits)."""
        if isinstance(self.action_dist, DiagGaussianDistribution):
            return self.action_dist.proba_distribution(action_net_output, self.log_std)
        assert isinstance(
            self.action_dist,
            (CategoricalDistribution, MultiCategoricalDistribution, BernoulliDistribution),
        )
        return self.action_dist.proba_distribution(action_logits=action_net_output)


class KFACActorCriticCnnPolicy(KFACActorCriticPolicy):
    """``CnnPolicy``: :class:`KFACActorCriticPolicy` with SB3's Nature CNN feature extractor."""

    default_extractor = NatureCNN


class KFACMultiInputActorCriticPolicy(KFACActorCriticPolicy):
    """``MultiInputPolicy`` (Dict observations): :class:`KFACActorCriticPolicy` with SB3's
    ``CombinedExtractor`` (a Nature CNN per image key, the other keys flattened)."""

    default_extractor = CombinedExtractor
