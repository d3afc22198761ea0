"""Stable-Baselines3 integration: rl_kfac.sb3.ACKTR / PPOKFAC and KFAC as SB3's optimizer."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.distributions import (
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv
from stable_baselines3.common.policies import ActorCriticPolicy

from rl_kfac import KFAC
from rl_kfac.sb3 import ACKTR, PPOKFAC, KFACActorCriticPolicy, distribution_kl, policy_fisher_loss
from tests.dense import with_ones

SMALL = {  # a constant learning rate: the default decays to 0 by the last update
    ACKTR: dict(n_steps=8, learning_rate=0.25),
    PPOKFAC: dict(n_steps=16, batch_size=16, n_epochs=2, learning_rate=0.25),
}


def image_env(discrete: bool):
    return make_vec_env(
        lambda: FakeImageEnv(action_dim=3, screen_height=40, screen_width=40, discrete=discrete),
        n_envs=2,
        seed=0,
    )


def env_for(kind: str):
    if kind == "discrete":
        return make_vec_env("CartPole-v1", n_envs=2, seed=0)
    if kind == "box":
        return make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    return image_env(discrete=kind == "image-discrete")


def layer_count(policy: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in policy.modules())


@pytest.mark.parametrize("algo", [ACKTR, PPOKFAC])
@pytest.mark.parametrize("kind", ["discrete", "box", "image-discrete", "image-box"])
def test_learn_records_statistics_and_steps(algo, kind):
    policy = "CnnPolicy" if kind.startswith("image") else "MlpPolicy"
    model = algo(policy, env_for(kind), seed=0, **SMALL[algo])
    before = [p.detach().clone() for p in model.policy.parameters()]
    rollouts = 2
    model.learn(rollouts * model.n_steps * model.n_envs)

    opt = model.policy.optimizer
    assert isinstance(opt, KFAC) and len(opt.blocks) == layer_count(model.policy)
    per_rollout = 1 if algo is ACKTR else 2 * (model.n_steps * model.n_envs // 16)
    assert opt.counters["steps"] == opt.counters["statistics_updates"] == rollouts * per_rollout
    assert opt.counters["skipped_steps"] == 0
    after = list(model.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    logged = model.logger.name_to_value
    assert 0 < logged["kfac/step_scale"] <= 1 and logged["kfac/damping"] > 0
    if algo is PPOKFAC:  # KL damping on by default: the update moved the policy
        assert logged["kfac/kl"] > 0


def first_layer_gram(model) -> torch.Tensor:
    obs = torch.as_tensor(model.rollout_buffer.observations).reshape(-1, 4).double()
    return (with_ones(obs).T @ with_ones(obs) / len(obs)).float()


def test_statistics_come_from_the_training_batch_only():
    """stat_decay 0: A of the first layers is exactly the rollout's input Gram matrix.

    Rollout forwards (acting, bootstrapping the last value) see other observations: had they
    been recorded, A would differ.
    """
    model = ACKTR("MlpPolicy", env_for("discrete"), n_steps=8, stat_decay=0.0, seed=1)
    model.learn(16)
    first = model.policy.mlp_extractor.policy_net[0]
    torch.testing.assert_close(
        model.policy.optimizer.state[first.weight]["A"], first_layer_gram(model)
    )
    assert model.policy.optimizer._capture.take_forward_log() == []


def test_drop_in_optimizer_uses_the_empirical_fisher_of_training_batches():
    kwargs = dict(statistics="empirical", stat_decay=0.0, kl_clip=1e-3, momentum=0.0)
    model = A2C(
        "MlpPolicy",
        env_for("discrete"),
        n_steps=8,
        learning_rate=0.25,
        policy_kwargs=dict(optimizer_class=KFAC, optimizer_kwargs=kwargs),
        seed=0,
    )
    model.learn(32)
    opt = model.policy.optimizer
    assert opt.counters["statistics_updates"] == opt.counters["steps"] == 2
    first = model.policy.mlp_extractor.policy_net[0]
    torch.testing.assert_close(opt.state[first.weight]["A"], first_layer_gram(model))


def test_drop_in_optimizer_with_sb3_cnn_policy():
    model = A2C(
        "CnnPolicy",
        image_env(discrete=True),
        n_steps=4,
        learning_rate=0.25,
        policy_kwargs=dict(optimizer_class=KFAC, optimizer_kwargs={"statistics": "empirical"}),
        seed=0,
    )
    model.learn(16)
    opt = model.policy.optimizer
    assert len(opt.blocks) == layer_count(model.policy)  # convs found on the first forward
    assert opt.counters["statistics_updates"] == opt.counters["steps"] == 2
    assert all("A" in opt.state[b.weight] for b in opt.blocks)


def same_next_update(model, loaded) -> None:
    """Both take one update on the same rollout with the same Fisher samples: equal results."""
    loaded.rollout_buffer = copy.deepcopy(model.rollout_buffer)
    loaded.set_logger(model.logger)
    for m in (model, loaded):
        torch.manual_seed(123)
        np.random.seed(123)  # PPO shuffles minibatches with numpy
        m.train()
    for p, q in zip(model.policy.parameters(), loaded.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a["kfac"] == b["kfac"] and a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["state"][key][name], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda env: ACKTR("MlpPolicy", env, n_steps=8, seed=0, damping_target_kl=0.01),
        lambda env: ACKTR("MlpPolicy", env, n_steps=8, seed=0, kl_clip=0.1, kl_clip_target=1e-6),
        lambda env: PPOKFAC("MlpPolicy", env, seed=0, **SMALL[PPOKFAC]),
        lambda env: PPOKFAC(
            "MlpPolicy", env, seed=0, policy_kwargs=dict(log_std_fisher=True), **SMALL[PPOKFAC]
        ),
        lambda env: PPO(
            "MlpPolicy",
            env,
            n_steps=16,
            batch_size=16,
            n_epochs=1,
            learning_rate=0.25,
            policy_kwargs=dict(optimizer_class=KFAC, optimizer_kwargs={"statistics": "empirical"}),
            seed=0,
        ),
    ],
    ids=["acktr", "acktr-kl_clip_target", "ppo_kfac", "ppo_kfac-log_std_fisher", "ppo+KFAC"],
)
def test_save_load_round_trip_restores_factors_and_continues_identically(make, tmp_path):
    env = env_for("box")
    model = make(env)
    model.learn(3 * model.n_steps * model.n_envs)
    model.save(tmp_path / "model")  # SB3 reloads optimizer state with weights_only=True
    loaded = type(model).load(tmp_path / "model", env=env)

    obs = np.stack([env.observation_space.sample() for _ in range(5)])
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    assert_state_equal(model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict())
    if getattr(model.policy, "log_std_fisher", False):  # the log-std in a group of its own
        for policy in (model.policy, loaded.policy):
            (own,) = [g for g in policy.optimizer.param_groups if "fisher_diagonal" in g]
            assert own["params"] == [policy.log_std] and own["fisher_diagonal"] == 2.0
    kl_clip = model.policy.optimizer.kl_clip
    if getattr(model, "kl_clip_control", None) is not None:  # a target this small shrank it
        assert kl_clip < 0.1 and model.logger.name_to_value["kfac/kl_clip"] == kl_clip
    assert loaded.policy.optimizer.kl_clip == kl_clip
    same_next_update(model, loaded)
    loaded.learn(model.n_steps * model.n_envs, reset_num_timesteps=False)
    assert loaded.policy.optimizer.counters["steps"] > model.policy.optimizer.counters["steps"]


def test_deepcopy_and_pickle_give_policies_whose_hooks_feed_their_own_optimizer():
    model = ACKTR("MlpPolicy", env_for("discrete"), n_steps=8, seed=0)
    model.learn(16)
    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(6)]))
    actions = torch.zeros(6, dtype=torch.long)
    # like SB3's own policies, a policy holds its last distribution: copy after acting, not
    # straight after a training forward (its tensors are not graph leaves then)
    model.predict(obs.numpy())
    for clone in (copy.deepcopy(model.policy), pickle.loads(pickle.dumps(model.policy))):
        counts = model.policy.optimizer.counters["statistics_updates"]
        clone.evaluate_actions(obs, actions)
        assert clone.optimizer.counters["statistics_updates"] == counts + 1
        assert model.policy.optimizer.counters["statistics_updates"] == counts
        assert {id(p) for p in clone.parameters()} == {
            id(p) for g in clone.optimizer.param_groups for p in g["params"]
        }


def test_invalid_setups_fail_before_training():
    env = env_for("discrete")
    with pytest.raises(ValueError, match="K-FAC policy"):
        ACKTR(ActorCriticPolicy, env)
    with pytest.raises(ValueError, match="kl_clip"):
        ACKTR("MlpPolicy", env, kl_clip=0.0)
    with pytest.raises(ValueError, match="kl_clip_target needs a kl_clip"):
        ACKTR("MlpPolicy", env, kl_clip=None, kl_clip_target=0.01)
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        ACKTR("MlpPolicy", env, policy_kwargs=dict(optimizer_kwargs={"damping": 0.1}))
    with pytest.raises(ValueError, match="log_std_fisher needs a Gaussian policy"):
        ACKTR("MlpPolicy", env, policy_kwargs=dict(log_std_fisher=True))
    with pytest.raises(ValueError, match="gSDE"):
        PPOKFAC("MlpPolicy", env_for("box"), use_sde=True)
    with pytest.raises(ValueError, match="Discrete, MultiDiscrete, MultiBinary and Box"):
        KFACActorCriticPolicy(
            spaces.Box(-1, 1, (2,)), spaces.Tuple([spaces.Discrete(2)]), lambda _: 0.1
        )
    with pytest.raises(ValueError, match="statistics"):
        KFAC(torch.nn.Linear(2, 2), statistics="diagonal")  # type: ignore[arg-type]


def mc_fisher(dist_of, params: torch.Tensor, samples: int = 40_000) -> torch.Tensor:
    """Average of (N ∂L/∂θ_n)(N ∂L/∂θ_n)ᵀ over a batch of identical states."""
    batch = params.detach().expand(samples, -1).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(policy_fisher_loss(dist_of(batch)), batch)
    rows = samples * grad
    return rows.T @ rows / samples


def test_sb3_distribution_fisher_losses_match_the_exact_fisher():
    torch.manual_seed(0)
    logits = torch.tensor([0.3, -1.0, 1.2])
    p = logits.softmax(-1)
    cat = mc_fisher(lambda z: CategoricalDistribution(3).proba_distribution(z), logits)
    torch.testing.assert_close(cat, torch.diag(p) - torch.outer(p, p), atol=0.01, rtol=0)

    multi = mc_fisher(
        lambda z: MultiCategoricalDistribution([2, 3]).proba_distribution(z),
        torch.tensor([0.5, -0.5, 0.3, -1.0, 1.2]),
    )
    q = torch.tensor([0.5, -0.5]).softmax(-1)
    torch.testing.assert_close(multi[:2, :2], torch.diag(q) - torch.outer(q, q), atol=0.01, rtol=0)
    torch.testing.assert_close(multi[:2, 2:], torch.zeros(2, 3), atol=0.01, rtol=0)
    torch.testing.assert_close(multi[2:, 2:], cat, atol=0.015, rtol=0)

    log_std = torch.tensor([-0.5, 0.4])
    gauss = mc_fisher(
        lambda mu: DiagGaussianDistribution(2).proba_distribution(mu, log_std),
        torch.tensor([0.1, -0.2]),
    )
    torch.testing.assert_close(gauss, torch.diag((-2 * log_std).exp()), atol=0.06, rtol=0.03)


def test_distribution_kl_matches_closed_forms():
    z1, z2 = torch.tensor([[0.2, -0.4, 1.0]]), torch.tensor([[0.0, 0.3, 0.1]])
    p, q = z1.softmax(-1), z2.softmax(-1)
    old = CategoricalDistribution(3).proba_distribution(z1)
    new = CategoricalDistribution(3).proba_distribution(z2)
    torch.testing.assert_close(distribution_kl(old, new), (p * (p / q).log()).sum(-1))

    m1, m2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])
    s1, s2 = torch.tensor([0.1, -0.3]), torch.tensor([-0.2, 0.2])
    old = DiagGaussianDistribution(2).proba_distribution(m1, s1)
    new = DiagGaussianDistribution(2).proba_distribution(m2, s2)
    v1, v2 = (2 * s1).exp(), (2 * s2).exp()
    by_hand = (s2 - s1 + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5).sum(-1)
    torch.testing.assert_close(distribution_kl(old, new), by_hand)


@pytest.mark.slow
def test_acktr_learns_cartpole():
    env = make_vec_env("CartPole-v1", n_envs=8, seed=0)
    model = ACKTR("MlpPolicy", env, n_steps=20, kl_clip=0.01, momentum=0.0, seed=0)
    model.learn(24_000)
    returns = [e["r"] for e in model.ep_info_buffer]
    assert math.fsum(returns) / len(returns) > 150  # random play: ~22
