"""Stable-Baselines3 integration: ACKTR and PPO-KFAC algorithms and K-FAC policies.

    from rl_kfac.sb3 import ACKTR
    model = ACKTR("MlpPolicy", "CartPole-v1").learn(100_000)

Plain SB3 algorithms can also take :class:`rl_kfac.KFAC` as their policy optimizer
(``policy_kwargs=dict(optimizer_class=KFAC, optimizer_kwargs=dict(statistics="empirical"))``);
the policies here record the true Fisher instead.
"""

from rl_kfac.sb3.algorithms import ACKTR, PPOKFAC
from rl_kfac.sb3.policies import (
    KFACActorCriticCnnPolicy,
    KFACActorCriticPolicy,
    KFACMultiInputActorCriticPolicy,
    distribution_kl,
    policy_fisher_loss,
)

MlpPolicy = KFACActorCriticPolicy
CnnPolicy = KFACActorCriticCnnPolicy
MultiInputPolicy = KFACMultiInputActorCriticPolicy

__all__ = [
    "ACKTR",
    "PPOKFAC",
    "CnnPolicy",
    "KFACActorCriticCnnPolicy",
    "KFACActorCriticPolicy",
    "KFACMultiInputActorCriticPolicy",
    "MlpPolicy",
    "MultiInputPolicy",
    "distribution_kl",
    "policy_fisher_loss",
]
