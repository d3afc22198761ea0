"""GAE and n-step returns by hand, time-limit bootstrapping, storage layout, Fisher losses."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from agents.networks import ActorCritic, PolicySpec
from agents.normalize import Normalizer
from agents.rollout import RolloutCollector, compute_gae
from rl_kfac.actor_critic import actor_critic_fisher_loss
from rl_kfac.fisher import categorical_fisher_loss, gaussian_fisher_loss, value_fisher_loss


def test_gae_matches_hand_computation():
    g, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    ends = torch.tensor([[0.0], [1.0], [0.0]])  # the episode ends after step 1
    last = torch.tensor([2.0])
    adv, ret = compute_gae(rewards, values, ends, last, g, lam)
    d2 = 3.0 + 0.9 * 2.0 - 1.5  # 3.3
    d1 = 2.0 - 1.0  # 1.0: no bootstrap across the episode end
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    a2, a1 = d2, d1
    a0 = d0 + 0.9 * 0.5 * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret, adv + values)
    # λ = 1: n-step returns
    _, ret1 = compute_gae(rewards, values, ends, last, g, 1.0)
    torch.testing.assert_close(ret1[:, 0], torch.tensor([1 + 0.9 * 2, 2.0, 3 + 0.9 * 2.0]))


class Counter(gym.Env):
    """obs = [t]; reward 1 each step; terminates (or is truncated) after ``horizon`` steps."""

    def __init__(self, horizon: int = 3, terminate: bool = False, image: bool = False) -> None:
        self.horizon, self.terminate, self.image = horizon, terminate, image
        shape, dtype = ((1, 4, 4), np.uint8) if image else ((1,), np.float32)
        self.observation_space = gym.spaces.Box(0, 255, shape, dtype)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def _obs(self):
        return np.full(self.observation_space.shape, self.t, self.observation_space.dtype)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        done = self.t >= self.horizon
        return self._obs(), 1.0, done and self.terminate, done and not self.terminate, {}


def make_envs(n, **kw):
    return SyncVectorEnv(
        [lambda: gym.wrappers.RecordEpisodeStatistics(Counter(**kw)) for _ in range(n)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )


def constant_value_policy(envs, value):
    policy = ActorCritic(envs.single_observation_space, envs.single_action_space, PolicySpec())
    with torch.no_grad():
        policy.vf.weight.zero_()
        policy.vf.bias.fill_(value)
    return policy


@pytest.mark.parametrize("terminate", [False, True])
def test_time_limit_truncation_is_bootstrapped_termination_is_not(terminate):
    gamma, c = 0.9, 2.0
    envs = make_envs(2, horizon=3, terminate=terminate)
    policy = constant_value_policy(envs, c)
    norm = Normalizer((1,), 2, gamma, obs=False, reward=False)
    collector = RolloutCollector(envs, policy, 4, gamma, 1.0, norm, torch.device("cpu"), 0)
    batch = collector.collect()
    # Steps 0..3 of each env: episode ends after step 2, step 3 starts a new episode.
    r_end = 1.0 + (0.0 if terminate else gamma * c)
    returns = batch.returns.reshape(4, 2)[:, 0]
    expected = torch.tensor(
        [1 + gamma * (1 + gamma * r_end), 1 + gamma * r_end, r_end, 1 + gamma * c]
    )
    torch.testing.assert_close(returns, expected)
    assert list(collector.episode_returns) == [3.0, 3.0]
    assert collector.finished[0][0] == 6  # the timestep (3 vector steps x 2 envs)


def test_storage_is_preallocated_on_the_device_with_the_right_shapes():
    envs = make_envs(3, image=True)
    spec = PolicySpec()
    policy = ActorCritic(envs.single_observation_space, envs.single_action_space, spec)
    norm = Normalizer((1, 4, 4), 3, 0.99, obs=False, reward=False)
    collector = RolloutCollector(envs, policy, 5, 0.99, 0.95, norm, torch.device("cpu"), 0)
    assert collector.obs.shape == (5, 3, 1, 4, 4) and collector.obs.dtype == torch.uint8
    assert collector.actions.shape == (5, 3) and collector.actions.dtype == torch.long
    batch = collector.collect()
    assert batch.obs.shape == (15, 1, 4, 4)
    for t in (batch.obs, batch.actions, batch.advantages, batch.returns, batch.log_probs):
        assert t.device.type == "cpu" and t.shape[0] == 15
    assert batch.obs.data_ptr() == collector.obs.data_ptr()  # a view, no copy


def test_categorical_fisher_loss_gradient_is_the_sampled_fisher():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 40_000
    logits = probs.log().expand(n, 4).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(categorical_fisher_loss(logits), logits)
    g = n * grad  # per sample: p - e_a
    onehot = probs - g
    assert torch.allclose(onehot.sum(-1), torch.ones(n), atol=1e-5)
    assert torch.allclose(onehot.max(-1).values, torch.ones(n), atol=1e-5)
    fisher = g.T @ g / n
    exact = torch.diag(probs) - torch.outer(probs, probs)
    torch.testing.assert_close(fisher, exact, atol=6e-3, rtol=0)


def test_gaussian_and_value_fisher_loss_gradients():
    torch.manual_seed(1)
    n = 40_000
    log_std = torch.tensor([0.0, -1.0, 0.5])
    mean = torch.zeros(n, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(gaussian_fisher_loss(mean, log_std.expand(n, 3)), mean)
    fisher = (n * grad).T @ (n * grad) / n
    torch.testing.assert_close(fisher, torch.diag((-2 * log_std).exp()), atol=0.08, rtol=0.03)
    values = torch.zeros(n, requires_grad=True)
    (gv,) = torch.autograd.grad(value_fisher_loss(values), values)
    assert abs(float((n * gv).pow(2).mean()) - 1.0) < 0.03


def test_value_fisher_weight_is_the_square_of_its_coefficient():
    """vf_fisher_coef scales the loss, so the value head's G is its square; OpenAI baselines'
    term ``(v − t)²`` (no ½, t = v + ε, coefficient 1) is ``vf_fisher_coef = 2`` here."""
    n = 40_000
    no_policy = torch.zeros(())
    for coef in (0.5, 3.0):
        torch.manual_seed(2)
        values = torch.zeros(n, requires_grad=True)
        loss = actor_critic_fisher_loss(no_policy, values, coef)
        (g,) = torch.autograd.grad(loss, values)
        assert abs(float((n * g).pow(2).mean()) / coef**2 - 1.0) < 0.03
    values = torch.randn(n, requires_grad=True)
    torch.manual_seed(3)
    (ours,) = torch.autograd.grad(actor_critic_fisher_loss(no_policy, values, 2.0), values)
    torch.manual_seed(3)
    target = (values + torch.randn_like(values)).detach()
    (theirs,) = torch.autograd.grad((values - target).pow(2).mean(), values)
    torch.testing.assert_close(ours, theirs)
    assert abs(float((n * theirs).pow(2).mean()) - 4.0) < 0.15
