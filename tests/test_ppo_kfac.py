"""PPO-KFAC and ACKTR loss pieces by hand, the damping controllers against their specification."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from agents.algorithm import explained_variance
from agents.config import load_config
from agents.ppo_kfac import clipped_surrogate, normalize, value_loss
from agents.trainer import Trainer
from rl_kfac.damping import KLDampingController, LevenbergMarquardt


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    # ratio 1.5, A>0: min(1.5, 1.2) = 1.2; ratio 0.5, A>0: min(0.5, 0.8) = 0.5
    # ratio 1.1, A<0: min(-2.2, -2.2) = -2.2; ratio 0.7, A<0: min(-0.7, -0.8) = -0.8
    expected = -(1.2 + 0.5 - 2.2 - 0.8) / 4
    assert float(clipped_surrogate(new, old, adv, 0.2)) == pytest.approx(expected)


def test_value_loss_plain_and_clipped_by_hand():
    values, old, returns = (
        torch.tensor([1.0, 3.0]),
        torch.tensor([0.0, 2.5]),
        torch.tensor([2.0, 2.0]),
    )
    assert float(value_loss(values, old, returns, None)) == pytest.approx((1 + 1) / 2)
    # clip 0.5: first clipped value 0.5 -> max(1, 2.25); second 3.0 (inside) -> max(1, 1)
    assert float(value_loss(values, old, returns, 0.5)) == pytest.approx((2.25 + 1) / 2)


def test_advantage_normalisation():
    a = normalize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(a.std()) == pytest.approx(1.0, abs=1e-6)


def test_explained_variance_by_hand():
    returns = torch.tensor([1.0, 2.0, 4.0, 5.0])  # mean 3, population variance 2.5
    values = torch.tensor([1.5, 2.0, 3.0, 5.5])  # residuals -0.5, 0, 1, -0.5: mean 0, var 0.375
    assert float(explained_variance(values, returns)) == pytest.approx(1 - 0.375 / 2.5)
    assert float(explained_variance(returns, returns)) == 1.0
    assert float(explained_variance(torch.full((4,), 3.0), returns)) == pytest.approx(0.0)
    assert math.isnan(float(explained_variance(values, torch.full((4,), 2.0))))


@pytest.mark.parametrize("normalize_advantage", [None, False, True])
def test_acktr_policy_loss_normalises_advantages_only_when_asked(normalize_advantage):
    import gymnasium as gym

    from agents.acktr import ACKTR
    from agents.config import Config
    from agents.networks import ActorCritic
    from agents.rollout import Batch

    torch.manual_seed(0)
    cfg = Config(normalize_advantage=normalize_advantage)
    policy = ActorCritic(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(4), cfg.policy_spec())
    obs, actions = torch.randn(6, 3), torch.randint(0, 4, (6,))
    adv = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 1.0])
    batch = Batch(obs, actions, torch.zeros(6), torch.zeros(6), adv, torch.zeros(6))
    dist, values = policy(obs)
    policy_loss = ACKTR(policy, cfg).a2c_loss(dist, values, batch)[1].detach()
    log_p = torch.distributions.Categorical(logits=dist.logits.detach()).log_prob(actions)
    if normalize_advantage:
        adv = (adv - adv.mean()) / adv.std()
    assert float(policy_loss) == pytest.approx(float(-(adv * log_p).mean()), abs=1e-6)


def test_kl_damping_is_monotone_bounded_and_moves_toward_the_target():
    ctl = KLDampingController(
        target_kl=0.01,
        rate=0.5,
        max_factor=2.0,
        damping_min=1e-3,
        damping_max=0.1,
        target_schedule="lr_squared",
    )
    kls = np.logspace(-6, 1, 200)
    out = [ctl.update(0.01, float(k)) for k in kls]
    assert all(b >= a for a, b in itertools.pairwise(out))  # monotone in the measured KL
    assert ctl.update(0.01, 0.01) == pytest.approx(0.01)  # on target: unchanged
    assert ctl.update(0.01, 0.04) == pytest.approx(0.02)  # (4)^0.5 = 2
    assert ctl.update(0.01, 0.0025) == pytest.approx(0.005)
    assert ctl.update(0.01, 10.0) == pytest.approx(0.02)  # at most max_factor per update
    assert ctl.update(0.08, 10.0) == pytest.approx(0.1)  # upper bound
    assert ctl.update(0.0015, 1e-9) == pytest.approx(1e-3)  # lower bound
    assert ctl.update(0.01, math.nan) == 0.01
    with pytest.raises(ValueError):
        KLDampingController(damping_min=1.0, damping_max=0.1)
    # at half the initial learning rate an update's KL is a quarter: the target follows
    assert ctl.update(0.01, 0.0025, lr_fraction=0.5) == pytest.approx(0.01)
    assert ctl.update(0.01, 0.01, lr_fraction=0.5) == pytest.approx(0.02)
    assert ctl.update(0.01, 0.0, lr_fraction=0.0) == 0.01  # the last step at lr 0: keep λ
    constant = KLDampingController(target_kl=0.01)  # the default: a fixed target
    assert constant.update(0.01, 0.0025, lr_fraction=0.5) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="target_schedule must be one of"):
        KLDampingController(target_schedule="lr")  # type: ignore[arg-type]


def test_kl_damping_does_not_undo_a_decaying_learning_rate():
    """Steps whose KL is ∝ lr²/λ (the quadratic model): with the target scaled by the schedule,
    λ settles where it was instead of falling as the learning rate decays."""
    from rl_kfac import KFAC
    from rl_kfac.actor_critic import adapt_damping_to_kl

    ctl = KLDampingController(
        target_kl=0.003, damping_min=1e-4, damping_max=1.0, target_schedule="lr_squared"
    )
    opt = KFAC(torch.nn.Linear(2, 2), lr=0.25, damping=0.05)
    for progress in np.linspace(0, 0.99, 300):
        opt.param_groups[0]["lr"] = 0.25 * (1 - progress)
        kl = 0.003 * (opt.param_groups[0]["lr"] / 0.25) ** 2 * (0.05 / opt.damping)
        adapt_damping_to_kl(opt, ctl, kl, initial_lr=0.25)
    assert opt.damping == pytest.approx(0.05, rel=0.05)
    fixed = KFAC(torch.nn.Linear(2, 2), lr=0.25, damping=0.05)  # without: λ falls to its floor
    for progress in np.linspace(0, 0.99, 300):
        fixed.param_groups[0]["lr"] = 0.25 * (1 - progress)
        kl = 0.003 * (fixed.param_groups[0]["lr"] / 0.25) ** 2 * (0.05 / fixed.damping)
        adapt_damping_to_kl(fixed, ctl, kl)
    assert fixed.damping < 0.005
    # target_schedule="constant" is that fixed target, initial_lr or not
    constant = KLDampingController(target_kl=0.003, target_schedule="constant")
    kept = KFAC(torch.nn.Linear(2, 2), lr=0.25, damping=0.05)
    for progress in np.linspace(0, 0.99, 300):
        kept.param_groups[0]["lr"] = 0.25 * (1 - progress)
        kl = 0.003 * (kept.param_groups[0]["lr"] / 0.25) ** 2 * (0.05 / kept.damping)
        adapt_damping_to_kl(kept, constant, kl, initial_lr=0.25)
    assert kept.damping == pytest.approx(fixed.damping)


def test_kl_damping_holds_when_the_clip_kept_the_kl_low():
    """hold_when_clipped: a clipped step whose KL fell short keeps λ; an overshoot still raises
    it, and an unclipped shortfall still lowers it. Whether the step was clipped comes from the
    optimizer's ν after a real step under a tight and a loose radius."""
    from rl_kfac import KFAC
    from rl_kfac.actor_critic import adapt_damping_to_kl

    hold = KLDampingController(target_kl=0.01, hold_when_clipped=True)
    assert hold.update(0.01, 0.0025, clipped=True) == 0.01
    assert hold.update(0.01, 0.04, clipped=True) == pytest.approx(0.02)
    assert hold.update(0.01, 0.0025, clipped=False) == pytest.approx(0.005)
    assert KLDampingController(target_kl=0.01).update(0.01, 0.0025, clipped=True) == (
        pytest.approx(0.005)
    )
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    for kl_clip, kept in ((1e-8, True), (None, False)):
        layer = torch.nn.Linear(3, 2)
        opt = KFAC(layer, lr=0.25, damping=0.05, kl_clip=kl_clip)
        out = layer(x)
        noisy = (out + torch.randn_like(out)).detach()
        opt.fisher_backward(0.5 * (noisy - out).pow(2).sum(1).mean())
        opt.zero_grad()
        out.pow(2).sum().backward()
        opt.step()
        assert (opt.diagnostics.step_scale < 1.0) == kept
        damping = adapt_damping_to_kl(opt, hold, 0.0025)
        assert damping == (0.05 if kept else pytest.approx(0.025))


def test_levenberg_marquardt_rule():
    lm = LevenbergMarquardt(omega=1.5, damping_min=1e-4, damping_max=1.0)
    predicted = LevenbergMarquardt.predicted_change(quadratic=2.0, step=0.5)
    assert predicted == pytest.approx(2.0 * (0.125 - 0.5))
    assert lm.update(0.1, actual=0.9 * predicted, predicted=predicted) == pytest.approx(0.1 / 1.5)
    assert lm.update(0.1, actual=0.5 * predicted, predicted=predicted) == pytest.approx(0.1)
    assert lm.update(0.1, actual=-0.1 * predicted, predicted=predicted) == pytest.approx(0.15)
    assert lm.update(0.9, actual=0.0, predicted=predicted) == pytest.approx(1.0)


def test_damping_config_errors():
    with pytest.raises(ValueError, match="damping_adaptation 'lm' needs algo acktr"):
        load_config("configs/ppo_kfac/cartpole.yaml", ["damping_adaptation=lm"])
    with pytest.raises(ValueError, match="damping_adaptation must be one of"):
        load_config("configs/ppo_kfac/cartpole.yaml", ["damping_adaptation=adam"])
    with pytest.raises(ValueError, match="damping_target_schedule must be one of"):
        load_config("configs/ppo_kfac/cartpole.yaml", ["damping_target_schedule=lr"])


def test_the_target_schedule_reaches_the_agent_and_the_sb3_settings():
    import gymnasium as gym

    from agents.networks import ActorCritic
    from agents.ppo_kfac import PPOKFAC
    from agents.sb3_settings import sb3_arguments

    for path, schedule in (
        ("configs/ppo_kfac/lunarlander.yaml", "constant"),
        ("configs/ppo_kfac/cartpole.yaml", "lr_squared"),
    ):
        cfg = load_config(path)
        box = gym.spaces.Box(-1, 1, (8,))
        policy = ActorCritic(box, gym.spaces.Discrete(4), cfg.policy_spec())
        assert PPOKFAC(policy, cfg).kl_damping.target_schedule == schedule
        options = sb3_arguments(cfg).get("damping_kwargs", {})
        assert options.get("target_schedule", "constant") == schedule
    cfg = load_config("configs/ppo_kfac/lunarlander.yaml", ["damping_hold_when_clipped=true"])
    policy = ActorCritic(box, gym.spaces.Discrete(4), cfg.policy_spec())
    assert PPOKFAC(policy, cfg).kl_damping.hold_when_clipped
    assert sb3_arguments(cfg)["damping_kwargs"]["hold_when_clipped"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("configs/ppo_kfac/cartpole.yaml", ["seed=1"]),
        ("configs/acktr/cartpole.yaml", ["damping_adaptation=lm", "seed=1"]),
    ],
)
def test_short_seeded_runs_improve_and_adapt_damping(tmp_path, config, overrides):
    torch.set_num_threads(1)
    cfg = load_config(config, ["total_timesteps=25000", *overrides])
    trainer = Trainer(cfg, tmp_path, progress=False)
    result = trainer.train()
    returns = [r for _, r, _ in result.episodes]
    first, last = np.mean(returns[:30]), np.mean(returns[-30:])
    assert last > 3 * first and last > 100, (first, last)
    assert trainer.algo.optimizer.damping != cfg.damping  # the controller moved it
    assert cfg.damping_min <= trainer.algo.optimizer.damping <= cfg.damping_max


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_acktr_value_steps_fit_the_critic_and_leave_the_policy_alone(shared_trunk):
    import copy

    import gymnasium as gym
    import torch.nn.functional as F

    from agents.acktr import ACKTR
    from agents.config import Config
    from agents.networks import ActorCritic
    from agents.rollout import Batch

    torch.manual_seed(0)
    spec = Config(shared_trunk=shared_trunk).policy_spec()
    net = ActorCritic(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), spec)
    obs, actions = torch.randn(64, 3), torch.randn(64, 2)
    returns = 3 * obs[:, 0] - obs[:, 1] ** 2  # a target the critic can fit
    batch = Batch(obs, actions, torch.zeros(64), torch.zeros(64), torch.randn(64), returns)
    nets, fits, logged = [], [], []
    for vf_steps in (0, 5):
        policy = copy.deepcopy(net)
        cfg = Config(vf_steps=vf_steps, momentum=0.0, kl_clip=0.01, shared_trunk=shared_trunk)
        torch.manual_seed(1)  # the same sampled Fisher actions in the joint step
        algo = ACKTR(policy, cfg.validate())
        stats = algo.update(batch, progress=0.0)
        diag = algo.optimizer.diagnostics.scalars()  # what the trainer merges under the stats
        logged.append([float({**diag, **stats}[k]) for k in ("kfac/step_scale", "kfac/quadratic")])
        nets.append(policy)
        with torch.no_grad():
            fits.append(float(F.mse_loss(policy(obs)[1], returns)))
    plain, fitted = (dict(n.named_parameters()) for n in nets)
    value_names = {n for n in plain if n.startswith(("critic.", "vf."))}
    assert value_names and len(value_names) < len(plain)
    for name in plain:
        same = torch.equal(plain[name], fitted[name])
        assert same == (name not in value_names), name  # only the critic moved further
    assert fits[1] < 0.8 * fits[0], fits  # five more K-FAC steps on the value loss fit it better
    # the logged trust-region scale and quadratic are the joint step's, not the last value step's
    assert logged[1] == logged[0] and algo.optimizer.diagnostics.quadratic != logged[0][1]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(vf_steps=-1), "vf_steps must be >= 0"),
        (dict(vf_steps=2, momentum=0.9), "vf_steps needs algo acktr with momentum 0"),
        (dict(vf_steps=2, momentum=0.0, algo="ppo_kfac"), "vf_steps needs algo acktr"),
        (dict(vf_steps=2, momentum=0.0, weight_decay=1e-4), "weight_decay 0"),
        (dict(vf_steps=2, momentum=0.0, factor_update_interval=10), "factor_update_interval 1"),
    ],
)
def test_value_steps_are_refused_where_the_policy_would_move(settings, message):
    from agents.config import Config

    with pytest.raises(ValueError, match=message):
        Config(**settings).validate()
