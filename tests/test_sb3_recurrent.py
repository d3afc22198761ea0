"""K-FAC in sb3-contrib's RecurrentPPO: as its optimizer (empirical Fisher) and as
``RecurrentPPOKFAC`` (true Fisher), with LSTM blocks, KL damping from the stored states, and
save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv

from rl_kfac import KFAC
from rl_kfac.sb3 import RecurrentPPOKFAC

SMALL = dict(n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")


def _image_env():
    return make_vec_env(
        lambda: FakeImageEnv(action_dim=3, screen_height=40, screen_width=40, discrete=True),
        n_envs=2,
        seed=0,
    )


def _lstm_blocks(opt: KFAC) -> set[str]:
    return {b.name for b in opt.blocks if ".ih_l0" in b.name or ".hh_l0" in b.name}


@pytest.mark.parametrize("policy", ["MlpLstmPolicy", "CnnLstmPolicy"])
def test_kfac_is_recurrent_ppos_optimizer_and_survives_save_load(tmp_path, policy):
    env = "CartPole-v1" if policy == "MlpLstmPolicy" else _image_env()
    model = RecurrentPPO(
        policy,
        env,
        learning_rate=0.05,
        max_grad_norm=float("inf"),
        policy_kwargs=dict(
            optimizer_class=KFAC,
            optimizer_kwargs=dict(statistics="empirical", kl_clip=1e-3, momentum=0.0),
            lstm_hidden_size=16,
        ),
        **SMALL,
    )
    model.learn(64)
    opt = model.policy.optimizer
    assert isinstance(opt, KFAC)
    assert len(_lstm_blocks(opt)) == 4  # actor and critic LSTMs: ih and hh each
    counters = opt.counters
    assert counters["statistics_updates"] == counters["steps"] > 0
    model.save(tmp_path / "m.zip")
    loaded = RecurrentPPO.load(tmp_path / "m.zip", device="cpu")
    assert loaded.policy.optimizer.counters == counters
    weight = model.policy.lstm_actor.weight_hh_l0
    twin = loaded.policy.lstm_actor.weight_hh_l0
    torch.testing.assert_close(loaded.policy.optimizer.state[twin]["G"], opt.state[weight]["G"])


def test_recurrent_ppo_kfac_records_the_true_fisher_and_adapts_damping(tmp_path):
    model = RecurrentPPOKFAC(
        "MlpLstmPolicy", "CartPole-v1", policy_kwargs=dict(lstm_hidden_size=16), **SMALL
    )
    assert model.policy.optimizer.statistics == "explicit"  # SB3's loss backward records nothing
    model.learn(64)
    opt = model.policy.optimizer
    assert _lstm_blocks(opt) == {
        "lstm_actor.ih_l0", "lstm_actor.hh_l0", "lstm_critic.ih_l0", "lstm_critic.hh_l0"
    }  # fmt: skip
    assert opt.counters["statistics_updates"] > 0 and opt.counters["skipped_steps"] == 0
    assert opt.damping != 0.01  # moved by the KL controller
    model.save(tmp_path / "m.zip")
    loaded = RecurrentPPOKFAC.load(tmp_path / "m.zip", device="cpu")
    obs = model.env.reset()
    for deterministic in (True,):
        mine, state = model.predict(obs, deterministic=deterministic)
        theirs, state2 = loaded.predict(obs, deterministic=deterministic)
        np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_allclose(state[0], state2[0], rtol=1e-6)
    assert loaded.policy.optimizer.counters == opt.counters


def test_the_kl_states_reproduce_the_rollouts_log_probabilities():
    """Each environment's stored sequence, replayed from the LSTM state stored at its start
    (episode starts resetting it), gives the log-probabilities the rollout recorded: the KL
    for damping compares the right policies."""
    model = RecurrentPPOKFAC(
        "MlpLstmPolicy",
        make_vec_env("CartPole-v1", n_envs=3, seed=0),
        policy_kwargs=dict(lstm_hidden_size=8),
        **{**SMALL, "n_steps": 40},
    )
    _, callback = model._setup_learn(120, callback=None)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=40)
    buffer = model.rollout_buffer
    assert np.asarray(buffer.episode_starts)[1:].any()  # episodes began inside the rollout
    dists = model._distributions(model._rollout_states())
    assert len(dists) == 1

    def by_env(x):  # (steps, envs) -> each env's sequence in turn, as the replay orders them
        return torch.as_tensor(np.asarray(x).reshape(40, 3).T.reshape(-1))

    actions = by_env(buffer.actions)
    torch.testing.assert_close(dists[0].log_prob(actions), by_env(buffer.log_probs))


def test_a_policy_without_kfac_is_refused():
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy

    with pytest.raises(ValueError, match="needs a K-FAC policy"):
        RecurrentPPOKFAC(RecurrentActorCriticPolicy, "CartPole-v1", **SMALL)


def test_dict_observations_and_padding_masks():
    """MultiInputLstmPolicy trains with KL damping (the replay handles Dict observations), and
    minibatches' padded steps are left out of the Fisher loss."""
    from stable_baselines3.common.envs import SimpleMultiObsEnv

    model = RecurrentPPOKFAC(
        "MultiInputLstmPolicy",
        make_vec_env(SimpleMultiObsEnv, n_envs=2, seed=0),
        policy_kwargs=dict(lstm_hidden_size=8),
        **SMALL,
    )
    seen = []
    real_steps = model.policy.real_steps

    def spy(mask):
        seen.append(mask.clone())
        return real_steps(mask)

    model.policy.real_steps = spy
    model.learn(64)
    assert seen and any(not bool(m.all()) for m in seen)  # some minibatches had padding
    assert model.policy.optimizer.counters["statistics_updates"] > 0


def test_the_fisher_loss_of_selected_rows():
    from stable_baselines3.common.distributions import CategoricalDistribution

    from rl_kfac.fisher import categorical_fisher_loss
    from rl_kfac.sb3 import policy_fisher_loss

    logits = torch.randn(6, 3)
    dist = CategoricalDistribution(3).proba_distribution(action_logits=logits)
    rows = torch.tensor([True, False, True, True, False, False])
    torch.manual_seed(0)
    mine = policy_fisher_loss(dist, rows)
    torch.manual_seed(0)
    torch.testing.assert_close(mine, categorical_fisher_loss(logits[rows]))
