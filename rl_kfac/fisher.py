"""Sampled-Fisher losses: the losses whose backward pass K-FAC records statistics from.

Each is the batch *mean* negative log-likelihood of targets sampled from the model's own
predictive distribution, with the sample detached. Its gradient at the distribution's parameters,
times the batch size N, is a one-sample estimate whose outer product has the exact Fisher as its
expectation (Martens & Grosse 2015, §5; ACKTR, Wu et al. 2017, §3.1):

- categorical over logits z:  N ∂L/∂z_n = p_n − e_{a_n},  E[(·)(·)ᵀ] = diag(p) − p pᵀ;
- diagonal Gaussian over its mean μ:  N ∂L/∂μ_n = −ε_n/σ,  E[(·)(·)ᵀ] = diag(1/σ²);
- independent Bernoullis over logits z:  N ∂L/∂z_n = σ(z_n) − b_n,  E = diag(σ(z)(1 − σ(z)));
- independent categoricals (MultiDiscrete): one categorical term per sub-action; the Fisher is
  block-diagonal over sub-actions and the losses add;
- value head, Gauss-Newton (Gaussian with σ = 1):  N ∂L/∂v_n = −ε_n,  E = 1.

A diagonal Gaussian's log-std needs no sampling: with z = ε/σ the score of log σ_i is z_i² − 1,
so its Fisher is E[(z_i² − 1)²] = 2 per dimension, with no cross term between dimensions or to the
mean (odd moments of z vanish). For a state-independent log-std this is exact for every batch
(:data:`GAUSSIAN_LOG_STD_FISHER`, the ``fisher_diagonal`` of :class:`rl_kfac.optimizer.KFAC`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GAUSSIAN_LOG_STD_FISHER = 2.0  # per-sample Fisher of N(μ, σ²) in each log σ_i: E[(z² − 1)²]


def sample_categorical(logits: Tensor) -> Tensor:
    """Indices sampled from ``softmax(logits)`` (Gumbel-max: one fused pass, no multinomial)."""
    gumbel = -torch.empty_like(logits).exponential_().log()
    return (logits.detach() + gumbel).argmax(dim=-1)


def categorical_fisher_loss(logits: Tensor) -> Tensor:
    """Mean NLL of actions sampled from the policy's own categorical distribution."""
    return F.cross_entropy(logits, sample_categorical(logits))


def multi_categorical_fisher_loss(logits: Tensor, sizes: list[int]) -> Tensor:
    """Sum over sub-actions of :func:`categorical_fisher_loss`; ``logits`` holds each
    sub-action's logits side by side (``sizes`` of them each) in its last dimension."""
    return torch.stack([categorical_fisher_loss(z) for z in logits.split(sizes, dim=-1)]).sum()


def bernoulli_fisher_loss(logits: Tensor) -> Tensor:
    """Mean NLL (summed over the bits) of bits sampled from independent ``Bernoulli(σ(z))``."""
    with torch.no_grad():
        bits = torch.bernoulli(torch.sigmoid(logits))
    nll = F.binary_cross_entropy_with_logits(logits, bits, reduction="none")
    return nll.sum(dim=-1).mean()


def gaussian_fisher_loss(mean: Tensor, log_std: Tensor) -> Tensor:
    """Mean NLL (summed over action dims) of actions sampled from N(mean, exp(log_std)²)."""
    std = log_std.exp()
    with torch.no_grad():
        target = mean + std * torch.randn_like(mean)
    nll = ((target - mean) / std).pow(2) / 2 + log_std + 0.5 * math.log(2 * math.pi)
    return nll.sum(dim=-1).mean()


def value_fisher_loss(values: Tensor) -> Tensor:
    """Gauss-Newton term of a value head: Gaussian NLL (σ = 1) of a sampled target."""
    with torch.no_grad():
        target = values + torch.randn_like(values)
    return 0.5 * F.mse_loss(values, target, reduction="sum") / values.shape[0]
