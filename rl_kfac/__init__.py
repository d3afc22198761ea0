"""rl-kfac: K-FAC with ACKTR's trust-region clip for reinforcement learning."""

from rl_kfac.blocks import ConvApprox
from rl_kfac.damping import DampingMode
from rl_kfac.optimizer import KFAC, Statistics

__all__ = ["KFAC", "ConvApprox", "DampingMode", "Statistics"]
__version__ = "0.1.0"
