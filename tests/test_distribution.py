"""agents.networks.Distribution against torch.distributions (an independent implementation)."""

from __future__ import annotations

import torch
from torch.distributions import Categorical, Independent, Normal, kl_divergence

from agents.networks import Distribution


def test_categorical_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 64, 5, generator=gen) * 3
    actions = torch.randint(0, 5, (64,), generator=gen)
    ours, other = Distribution(logits=p_logits), Distribution(logits=q_logits)
    ref, ref_other = Categorical(logits=p_logits), Categorical(logits=q_logits)
    torch.testing.assert_close(ours.log_prob(actions), ref.log_prob(actions))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    torch.testing.assert_close(ours.kl(other), kl_divergence(ref, ref_other))
    assert torch.equal(ours.mode(), ref.probs.argmax(-1))


def test_diagonal_gaussian_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mean, other_mean = torch.randn(2, 64, 3, generator=gen)
    log_std = torch.randn(64, 3, generator=gen) * 0.5
    other_log_std = torch.randn(64, 3, generator=gen) * 0.5
    actions = torch.randn(64, 3, generator=gen) * 2
    ours = Distribution(mean=mean, log_std=log_std)
    other = Distribution(mean=other_mean, log_std=other_log_std)
    ref = Independent(Normal(mean, log_std.exp()), 1)
    ref_other = Independent(Normal(other_mean, other_log_std.exp()), 1)
    torch.testing.assert_close(ours.log_prob(actions), ref.log_prob(actions))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    torch.testing.assert_close(ours.kl(other), kl_divergence(ref, ref_other))
    assert torch.equal(ours.mode(), mean)


def test_samples_follow_the_distribution():
    """Sample moments: frequencies of the Gumbel-max sampler, mean and std of the Gaussian."""
    torch.manual_seed(2)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(200_000, 4)
    counts = torch.bincount(Distribution(logits=logits).sample(), minlength=4).double()
    torch.testing.assert_close(
        counts / counts.sum(), logits[0].softmax(-1).double(), atol=4e-3, rtol=0
    )
    mean = torch.tensor([1.0, -2.0]).expand(200_000, 2)
    log_std = torch.tensor([0.0, -1.0]).expand(200_000, 2)
    x = Distribution(mean=mean, log_std=log_std).sample()
    torch.testing.assert_close(x.mean(0), mean[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(x.std(0), log_std[0].exp(), atol=1e-2, rtol=0)
