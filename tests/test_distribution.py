"""agents.distributions against torch.distributions (an independent implementation)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Normal, kl_divergence

from agents import distributions as ours
from rl_kfac.fisher import GAUSSIAN_LOG_STD_FISHER


def test_categorical_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 64, 5, generator=gen) * 3
    actions = torch.randint(0, 5, (64,), generator=gen)
    mine, other = ours.Categorical(p_logits), ours.Categorical(q_logits)
    ref, ref_other = Categorical(logits=p_logits), Categorical(logits=q_logits)
    torch.testing.assert_close(mine.log_prob(actions), ref.log_prob(actions))
    torch.testing.assert_close(mine.entropy(), ref.entropy())
    torch.testing.assert_close(mine.kl(other), kl_divergence(ref, ref_other))
    assert torch.equal(mine.mode(), ref.probs.argmax(-1))


def test_diagonal_gaussian_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mean, other_mean = torch.randn(2, 64, 3, generator=gen)
    log_std = torch.randn(64, 3, generator=gen) * 0.5
    other_log_std = torch.randn(64, 3, generator=gen) * 0.5
    actions = torch.randn(64, 3, generator=gen) * 2
    mine = ours.DiagGaussian(mean, log_std)
    other = ours.DiagGaussian(other_mean, other_log_std)
    ref = Independent(Normal(mean, log_std.exp()), 1)
    ref_other = Independent(Normal(other_mean, other_log_std.exp()), 1)
    torch.testing.assert_close(mine.log_prob(actions), ref.log_prob(actions))
    torch.testing.assert_close(mine.entropy(), ref.entropy())
    torch.testing.assert_close(mine.kl(other), kl_divergence(ref, ref_other))
    assert torch.equal(mine.mode(), mean)


def test_log_std_fisher_is_the_exact_fisher_of_a_normal():
    """E[-∇² log N(x; μ, e^s)] over x by Gauss-Hermite quadrature, from torch.distributions:
    2 on each log-std, no cross term to the mean or between dimensions, 1/σ² on the mean."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)  # ∫ f(z) e^{-z²/2}: exact to deg 79
    weights = weights / weights.sum()
    mean, log_std = torch.tensor([0.3, -1.0]), torch.tensor([-0.5, 0.7])
    theta = torch.cat([mean, log_std]).double()

    def log_prob(t, x):
        return Normal(t[:2], t[2:].exp()).log_prob(x).sum()

    fisher = torch.zeros(4, 4, dtype=torch.float64)
    for z1, w1 in zip(nodes, weights):
        for z2, w2 in zip(nodes, weights):
            x = theta[:2] + theta[2:].exp() * torch.tensor([z1, z2], dtype=torch.float64)
            hess = torch.autograd.functional.hessian(lambda t, x=x: log_prob(t, x), theta)
            fisher -= w1 * w2 * hess
    expected = torch.diag(torch.cat([(-2 * theta[2:]).exp(), torch.full((2,), 2.0).double()]))
    torch.testing.assert_close(fisher, expected, atol=1e-9, rtol=1e-9)
    assert fisher[2, 2].item() == pytest.approx(GAUSSIAN_LOG_STD_FISHER, rel=1e-9)


def test_independent_categoricals_match_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 2, 4]
    p_logits, q_logits = torch.randn(2, 32, sum(sizes), generator=gen) * 2
    actions = torch.stack([torch.randint(0, n, (32,), generator=gen) for n in sizes], -1)
    mine, other = ours.MultiCategorical(p_logits, sizes), ours.MultiCategorical(q_logits, sizes)
    refs = [Categorical(logits=z) for z in p_logits.split(sizes, -1)]
    ref_others = [Categorical(logits=z) for z in q_logits.split(sizes, -1)]
    log_prob = sum(r.log_prob(a) for r, a in zip(refs, actions.unbind(-1)))
    torch.testing.assert_close(mine.log_prob(actions), log_prob)
    torch.testing.assert_close(mine.entropy(), sum(r.entropy() for r in refs))
    kl = sum(kl_divergence(p, q) for p, q in zip(refs, ref_others))
    torch.testing.assert_close(mine.kl(other), kl)
    assert mine.sample().shape == (32, 3)
    assert torch.equal(mine.mode(), torch.stack([r.probs.argmax(-1) for r in refs], -1))


def test_bernoullis_match_torch_distributions():
    gen = torch.Generator().manual_seed(4)
    p_logits, q_logits = torch.randn(2, 32, 5, generator=gen) * 2
    bits = torch.randint(0, 2, (32, 5), generator=gen).float()
    mine, other = ours.Bernoulli(p_logits), ours.Bernoulli(q_logits)
    ref = Independent(Bernoulli(logits=p_logits), 1)
    ref_other = Independent(Bernoulli(logits=q_logits), 1)
    torch.testing.assert_close(mine.log_prob(bits), ref.log_prob(bits))
    torch.testing.assert_close(mine.entropy(), ref.entropy())
    torch.testing.assert_close(mine.kl(other), kl_divergence(ref, ref_other))
    assert torch.equal(mine.mode(), (p_logits.sigmoid() > 0.5).float())


def test_samples_follow_the_distribution():
    """Sample moments: frequencies of the Gumbel-max sampler, the Bernoulli bits, mean and std
    of the Gaussian."""
    torch.manual_seed(2)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(200_000, 4)
    counts = torch.bincount(ours.Categorical(logits).sample(), minlength=4).double()
    torch.testing.assert_close(
        counts / counts.sum(), logits[0].softmax(-1).double(), atol=4e-3, rtol=0
    )
    bit_logits = torch.tensor([[1.5, -0.5]]).expand(200_000, 2)
    freq = ours.Bernoulli(bit_logits).sample().mean(0)
    torch.testing.assert_close(freq, bit_logits[0].sigmoid(), atol=4e-3, rtol=0)
    mean = torch.tensor([1.0, -2.0]).expand(200_000, 2)
    log_std = torch.tensor([0.0, -1.0]).expand(200_000, 2)
    x = ours.DiagGaussian(mean, log_std).sample()
    torch.testing.assert_close(x.mean(0), mean[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(x.std(0), log_std[0].exp(), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "space, action, sent",
    [
        (gym.spaces.Discrete(3, start=-1), [2], [1]),
        (gym.spaces.MultiDiscrete([3, 2], start=[1, 0]), [[2, 1]], [[3, 1]]),
        (gym.spaces.MultiBinary([2, 2]), [[1.0, 0.0, 0.0, 1.0]], [[[1, 0], [0, 1]]]),
        (gym.spaces.Box(-1.0, 1.0, (2, 2)), [[0.5, 3.0, -3.0, 0.0]], [[[0.5, 1], [-1, 0]]]),
    ],
)
def test_actions_reach_the_environment_in_its_space(space, action, sent):
    head = ours.ActionHead(space)
    out = head.to_env(torch.tensor(action))
    assert out.dtype == space.dtype
    np.testing.assert_array_equal(out, np.asarray(sent, dtype=space.dtype))
    assert space.contains(out[0])


def test_action_spaces_without_a_head_are_refused():
    with pytest.raises(ValueError, match="unsupported action space"):
        ours.ActionHead(gym.spaces.Tuple([gym.spaces.Discrete(2)]))
