"""Recurrent ACKTR and PPO-KFAC: states through rollouts, episode starts, minibatches of whole
sequences, the truncation bootstrap, and the K-FAC blocks of the policy's LSTM/GRU."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.config import Config, load_config
from agents.envs import make_vec_env
from agents.networks import ActorCritic, PolicySpec
from agents.normalize import Normalizer
from agents.ppo_kfac import minibatches
from agents.rollout import RolloutCollector, evaluate


class FinalObservations(gym.vector.VectorWrapper):
    """Keeps each step's ``final_obs`` (the observation an episode ended on)."""

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.finals: list[dict[int, np.ndarray]] = []

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        ended = np.flatnonzero(terminated | truncated)
        self.finals.append({int(i): info["final_obs"][i] for i in ended})
        return obs, reward, terminated, truncated, info


def _setup(
    recurrent: str, steps: int = 12, n_envs: int = 3, limit: int = 5, shared_core: bool = True
):
    torch.manual_seed(0)
    envs = FinalObservations(
        make_vec_env("CartPole-v1", n_envs, env_kwargs={"max_episode_steps": limit})
    )
    spec = Config(
        recurrent=recurrent, hidden_size=8, hidden=[16], shared_core=shared_core
    ).policy_spec()
    policy = ActorCritic(envs.single_observation_space, envs.single_action_space, spec)
    norm = Normalizer((4,), n_envs, 0.99, obs=False, reward=False)
    collector = RolloutCollector(envs, policy, steps, 0.99, 0.95, norm, torch.device("cpu"), seed=0)
    return envs, policy, collector


@pytest.mark.parametrize(
    ("recurrent", "shared_core"), [("lstm", True), ("gru", True), ("lstm", False), ("gru", False)]
)
def test_replaying_the_stored_sequences_gives_the_rollouts_log_probs_and_values(
    recurrent, shared_core
):
    """Episode starts, the states at rollout start and the resets mid-rollout are stored
    correctly exactly when replaying them reproduces what the rollout computed."""
    _, policy, collector = _setup(recurrent, shared_core=shared_core)
    for _ in range(2):  # the second rollout starts from the first one's last state
        batch = collector.collect()
        assert batch.starts is not None and batch.starts.any() and batch.states is not None
        with torch.no_grad():
            dist, values = evaluate(policy, batch)
        torch.testing.assert_close(dist.log_prob(batch.actions), batch.log_probs)
        torch.testing.assert_close(values, batch.values)
    assert batch.states.abs().sum() > 0  # not just zeros
    with torch.no_grad():  # and without the starts the replay differs: the check can fail
        wrong = policy.sequence(batch.obs, batch.states, torch.zeros_like(batch.starts))[1]
    assert not torch.allclose(wrong, batch.values)


@pytest.mark.parametrize("shared_core", [True, False])
def test_the_truncation_bootstrap_uses_the_state_after_the_last_step(shared_core):
    envs, policy, collector = _setup("lstm", steps=12, limit=5, shared_core=shared_core)
    batch = collector.collect()
    assert batch.states is not None and batch.starts is not None
    steps, n = batch.starts.shape
    obs = batch.obs.reshape(steps, n, -1)
    state = batch.states
    checked = 0
    with torch.no_grad():
        for t in range(steps):  # the states step by step, independently of the collector
            _, _, state = policy.step(obs[t], state, batch.starts[t])
            for e, final in envs.finals[t].items():
                x = torch.as_tensor(final, dtype=torch.float32)[None]
                after = policy.step(x, state[:, :, [e]], torch.zeros(1, dtype=torch.bool))[1]
                zeroed = policy.step(
                    x, torch.zeros_like(state[:, :, [e]]), torch.ones(1, dtype=torch.bool)
                )[1]
                torch.testing.assert_close(collector.bootstrap[t, e], after[0])
                assert not torch.isclose(collector.bootstrap[t, e], zeroed[0])
                checked += 1
    assert checked >= 3  # every env was truncated at step 5 and 10


def test_ppo_minibatches_are_whole_environment_sequences():
    _, _, collector = _setup("gru", steps=4, n_envs=6)
    batch = collector.collect()
    parts = minibatches(batch, size=8)  # 8 // 4 steps: 2 sequences each
    assert len(parts) == 3
    seen = []
    for part in parts:
        assert part.starts is not None and part.starts.shape == (4, 2) and len(part) == 8
        obs = batch.obs.reshape(4, 6, -1)
        # each column of the minibatch is one env's sequence, in time order
        for col in range(2):
            match = [
                e for e in range(6) if torch.equal(obs[:, e], part.obs.reshape(4, 2, -1)[:, col])
            ]
            assert len(match) == 1
            seen += match
    assert sorted(seen) == list(range(6))


def test_a_critic_core_of_its_own_keeps_the_value_out_of_the_policys_memory():
    """With ``shared_core`` false the value's gradient reaches only the critic's core and the
    policy's only the actor's; with a shared core the value's reaches it (the check can fail)."""
    box, actions = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (1,))
    torch.manual_seed(0)
    obs, starts = torch.randn(5 * 2, 3), torch.zeros(5, 2, dtype=torch.bool)
    starts[2, 1] = True  # an episode start mid-sequence: two stretches of the core
    for shared in (True, False):
        policy = ActorCritic(
            box, actions, Config(recurrent="lstm", hidden_size=6, shared_core=shared).policy_spec()
        )
        assert policy.initial_state(2).shape == (2, 1 if shared else 2, 2, 6)
        dist, value = policy.sequence(obs, torch.randn_like(policy.initial_state(2)), starts)
        rnn = list(policy.rnn.parameters())
        from_value = torch.autograd.grad(value.sum(), rnn, retain_graph=True, allow_unused=True)
        reaches = any(g is not None and g.abs().sum() > 0 for g in from_value)
        assert reaches == shared
        if shared:
            assert policy.critic_rnn is None
            continue
        critic = list(policy.critic_rnn.parameters())
        assert {id(p) for p in critic} <= {id(p) for p in policy.value_parameters()}
        log_prob = dist.log_prob(torch.zeros(10, 1)).sum()
        from_policy = torch.autograd.grad(log_prob, critic, retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().sum() == 0 for g in from_policy)
        assert torch.autograd.grad(value.sum(), critic)[0].abs().sum() > 0


def test_a_critic_core_of_its_own_needs_a_recurrent_core_and_separate_trunks():
    lstm_shared_trunk = ["recurrent=lstm", "shared_core=false", "shared_trunk=true"]
    for bad in (["shared_core=false"], lstm_shared_trunk):
        with pytest.raises(ValueError, match="shared_core false"):
            load_config("configs/acktr/cartpole.yaml", bad)
    with pytest.raises(ValueError, match="shared_core false"):  # the network's own spec too
        PolicySpec(shared_core=False)


@pytest.mark.parametrize(
    ("algo", "shared_core"), [("acktr", True), ("ppo_kfac", True), ("ppo_kfac", False)]
)
def test_training_preconditions_the_policy_lstm(tmp_path, algo, shared_core):
    from agents.trainer import Trainer

    cfg = load_config(
        f"configs/{algo}/cartpole_novel.yaml",
        [
            "total_timesteps=1024",
            "factor_update_interval=1",
            "n_epochs=1",
            f"shared_core={str(shared_core).lower()}",
        ],
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        trainer.train()
    names = {b.name for b in trainer.algo.optimizer.blocks}
    assert {"rnn.ih_l0", "rnn.hh_l0", "pi", "vf"} <= names
    assert shared_core or {"critic_rnn.ih_l0", "critic_rnn.hh_l0"} <= names
    assert not [w for w in record if "no K-FAC" in str(w.message)]
    counters = trainer.algo.optimizer.counters
    assert counters["statistics_updates"] >= 4 and counters["skipped_steps"] == 0
    assert all(p.isfinite().all() for p in trainer.policy.parameters())


def test_a_recurrent_run_resumes_and_evaluates(tmp_path):
    from agents.cli import evaluate_main, train_main

    run = tmp_path / "run"
    args = ["--config", "configs/acktr/cartpole_novel.yaml", "--no-progress"]
    assert train_main([*args, "--log-dir", str(run), "--total-timesteps", "512"]) == 0
    assert (
        train_main(["--resume", str(run / "last.pt"), "--total-timesteps", "1024", "--no-progress"])
        == 0
    )
    assert evaluate_main([str(run / "last.pt"), "--episodes", "2"]) == 0


def test_a_feed_forward_policy_refuses_recurrent_calls_and_vice_versa():
    box, actions = gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2)
    lstm = ActorCritic(box, actions, Config(recurrent="lstm").policy_spec())
    with pytest.raises(ValueError, match="recurrent policy takes step"):
        lstm(torch.zeros(1, 4))
    assert ActorCritic(box, actions, Config().policy_spec()).initial_state(3).numel() == 0
    with pytest.raises(ValueError, match="recurrent must be one of"):
        load_config("configs/acktr/cartpole.yaml", ["recurrent=rnn"])
