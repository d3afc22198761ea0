"""Stable-Baselines3 integration: ACKTR and PPO-KFAC algorithms and K-FAC policies.

    from rl_kfac.sb3 import ACKTR
    model = ACKTR("MlpPolicy", "CartPole-v1").learn(100_000)

Plain SB3 algorithms can also take :class:`rl_kfac.KFAC` as their policy optimizer
(``policy_kwargs=dict(optimizer_class=KFAC, optimizer_kwargs=dict(statistics="empirical"))``);
the policies here record the true Fisher instead. ``RecurrentPPOKFAC`` (LSTM policies, on
sb3-contrib's ``RecurrentPPO``) needs sb3-contrib: ``pip install "rl-kfac[zoo]"``.
"""

from typing import Any

from rl_kfac.sb3.algorithms import ACKTR, PAPER, PPOKFAC
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


def __getattr__(name: str) -> Any:
    """``RecurrentPPOKFAC`` and its policies, imported on first use (sb3-contrib is optional)."""
    if name in ("RecurrentPPOKFAC", "KFACRecurrentActorCriticPolicy"):
        try:
            from rl_kfac.sb3 import recurrent
        except ImportError as err:
            raise ImportError(
                f"rl_kfac.sb3.{name} needs sb3-contrib: pip install sb3-contrib ({err})"
            ) from None
        return getattr(recurrent, name)
    raise AttributeError(f"module 'rl_kfac.sb3' has no attribute {name!r}")


__all__ = [
    "ACKTR",
    "PAPER",
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
