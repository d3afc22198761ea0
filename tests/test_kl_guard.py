"""The KL guard (rl_kfac.kl_guard): a step whose measured KL overshoots the bound is shrunk or
undone, against KLs computed here with torch.distributions and a dense Fisher."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, kl_divergence

from rl_kfac import KFAC
from rl_kfac.actor_critic import adapt_damping_to_kl
from rl_kfac.damping import KLDampingController
from rl_kfac.fisher import categorical_fisher_loss

N, D, K = 4096, 5, 3
KL_CLIP = 1e-3
SCALE = 0.1  # the statistics see inputs 10x too small: the model's Fisher is 100x too small


def contrived(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear softmax policy at zero weights (uniform π, whatever the input), one state ``x``
    repeated N times, and a policy-gradient loss's actions and advantages on it."""
    torch.manual_seed(seed)
    policy = nn.Linear(D, K, bias=False)
    nn.init.zeros_(policy.weight)
    x = torch.randn(1, D).expand(N, D).contiguous()
    actions = torch.randint(K, (N,))
    advantages = torch.randn(N)
    return policy, x, actions, advantages


def exact_fisher(policy: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Dense Fisher of the categorical policy at one state (all rows of ``x`` are equal):
    ``Σ_a p_a ∇ log p_a ∇ log p_aᵀ`` over the flattened weight."""
    logits = policy(x[:1])[0]
    p = logits.softmax(-1).detach()
    scores = []
    for a in range(K):
        (grad,) = torch.autograd.grad(logits.log_softmax(-1)[a], policy.weight, retain_graph=True)
        scores.append(grad.flatten())
    s = torch.stack(scores)
    return (s.T * p) @ s


def step_on_contrived(guard: float | None, backtracks: int = 5) -> dict[str, float]:
    policy, x, actions, advantages = contrived()
    opt = KFAC(
        policy,
        lr=1.0,
        momentum=0.0,
        damping=1e-8,
        kl_clip=KL_CLIP,
        inverse_update_interval=1,
        kl_guard=guard,
        kl_guard_backtracks=backtracks,
    )
    opt.fisher_backward(categorical_fisher_loss(policy(SCALE * x)))
    old = Categorical(logits=policy(x).detach())
    w0 = policy.weight.detach().clone()
    loss = -(advantages * Categorical(logits=policy(x)).log_prob(actions)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step(kl=lambda: kl_divergence(old, Categorical(logits=policy(x))).mean())
    delta = (policy.weight.detach() - w0).flatten()
    with torch.no_grad():
        measured = float(kl_divergence(old, Categorical(logits=policy(x))).mean())
    model_fisher = exact_fisher(nn.Linear(D, K, bias=False).requires_grad_(), SCALE * x)
    return {
        "measured": measured,
        # K-FAC is exact for one linear layer at one (repeated) state: its model is F at 0.1·x
        "model": float(0.5 * delta @ model_fisher @ delta),
        "rejected": opt.counters["rejected_steps"],
        "kept": opt.diagnostics.step_kept,
        "step_kl": opt.diagnostics.step_kl,
    }


def test_the_contrived_batch_fools_the_model_by_100x_without_the_guard():
    out = step_on_contrived(guard=None)
    assert out["model"] == pytest.approx(KL_CLIP / 2, rel=0.1)  # the clip bound the model's KL
    assert out["measured"] / out["model"] > 80  # the true KL is ~100x the model's
    assert out["rejected"] == 0 and out["kept"] == 1.0 and math.isnan(out["step_kl"])


@pytest.mark.parametrize("guard", [1.0, 2.0, 10.0])
def test_the_guard_ends_the_step_under_its_bound(guard):
    out = step_on_contrived(guard=guard)
    assert out["measured"] <= guard * KL_CLIP
    assert out["measured"] == pytest.approx(out["step_kl"], rel=1e-6)
    assert out["rejected"] == 1 and 0 < out["kept"] < 1
    # not shrunk to nothing: KL is about quadratic in the step, so it lands within 4x of b
    assert out["measured"] > guard * KL_CLIP / 8


def test_a_step_under_the_bound_stands_unchanged():
    out = step_on_contrived(guard=None)
    kept = step_on_contrived(guard=1.05 * out["measured"] / KL_CLIP)
    assert kept["rejected"] == 0 and kept["kept"] == 1.0
    assert kept["measured"] == out["measured"]


def test_an_undone_step_leaves_parameters_and_momentum_exactly_as_before():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model, lr=0.5, momentum=0.9, kl_clip=0.01, kl_guard=1.0, kl_guard_backtracks=0)
    x = torch.randn(64, 4)

    def gradient() -> None:
        opt.fisher_backward(categorical_fisher_loss(model(x)))
        opt.zero_grad()
        model(x).pow(2).mean().backward()

    gradient()
    opt.step()  # no KL given: not checked; warms the momentum buffers
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    assert all(b.abs().sum() > 0 for b in buffers)
    gradient()
    opt.step(kl=lambda: 1.0)  # past the bound 0.01 with no shrink allowed: undone
    assert opt.counters["rejected_steps"] == 1 and opt.diagnostics.step_kept == 0.0
    for p, old, buf in zip(model.parameters(), before, buffers):
        assert torch.equal(p.detach(), old)
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)


def test_a_shrunk_step_scales_parameters_and_momentum_by_the_same_fraction():
    torch.manual_seed(2)
    model = nn.Linear(4, 3)
    x = torch.randn(32, 4)
    runs = []
    for guard in (None, 1.0):
        torch.manual_seed(3)
        model.reset_parameters()
        opt = KFAC(model, lr=0.5, momentum=0.5, kl_clip=0.01, kl_guard=guard)
        opt.fisher_backward(categorical_fisher_loss(model(x)))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        start = [p.detach().clone() for p in model.parameters()]
        calls = iter([0.02, 0.0])  # KL 2x the bound: s = min(½, 0.9·√½) = ½, then it stands
        opt.step(kl=functools.partial(next, calls))
        runs.append(
            (start, [p.detach().clone() for p in model.parameters()], opt.diagnostics.step_kept)
        )
        bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
        runs[-1] += (bufs,)
    (s0, full, _, full_bufs), (s1, half, kept, half_bufs) = runs
    assert kept == 0.5
    for a, b, f, h in zip(s0, s1, full, half):
        assert torch.equal(a, b)
        torch.testing.assert_close(h - b, 0.5 * (f - a))
    for f, h in zip(full_bufs, half_bufs):  # the buffers were zero before the step
        torch.testing.assert_close(h, 0.5 * f)


def test_check_next_step_guards_one_step_only():
    model = nn.Linear(3, 2)
    opt = KFAC(model, kl_clip=0.01, kl_guard=1.0, kl_guard_backtracks=0)
    x = torch.randn(16, 3)
    for _ in range(2):
        opt.fisher_backward(categorical_fisher_loss(model(x)))
        opt.zero_grad()
        model(x).sum().backward()
        if _ == 0:
            opt.check_next_step(lambda: math.inf)
        opt.step()
    assert opt.counters["rejected_steps"] == 1
    assert opt.pop_rejected_steps() == 1 and opt.pop_rejected_steps() == 0
    assert opt.diagnostics.step_kept == 1.0  # the second step was not checked


def test_a_rejection_raises_the_damping_by_the_controllers_largest_factor():
    model = nn.Linear(3, 2)
    opt = KFAC(model, damping=0.01, kl_clip=0.01, kl_guard=1.0, kl_guard_backtracks=0)
    controller = KLDampingController(target_kl=0.01, max_factor=2.0)
    x = torch.randn(16, 3)
    opt.fisher_backward(categorical_fisher_loss(model(x)))
    model(x).sum().backward()
    opt.step(kl=lambda: 5.0)
    # the kept KL (0: undone) alone would lower λ; the rejection raises it instead
    assert adapt_damping_to_kl(opt, controller, 0.0) == pytest.approx(0.02)
    assert adapt_damping_to_kl(opt, controller, 0.0) == pytest.approx(0.01)  # read once


def test_rejected_steps_survive_a_state_dict_round_trip():
    model = nn.Linear(3, 2)
    opt = KFAC(model, kl_clip=0.01, kl_guard=1.0, kl_guard_backtracks=0)
    x = torch.randn(16, 3)
    opt.fisher_backward(categorical_fisher_loss(model(x)))
    model(x).sum().backward()
    opt.step(kl=lambda: 5.0)
    other = KFAC(model, kl_clip=0.01, kl_guard=1.0)
    other.load_state_dict(opt.state_dict())
    assert other.counters["rejected_steps"] == 1


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_bound_that_is_not_positive_and_finite_is_refused(bad):
    with pytest.raises(ValueError, match="kl_guard must be > 0 and finite") as info:
        KFAC(nn.Linear(2, 2), kl_guard=bad)
    assert "\n" not in str(info.value)


def test_a_guard_without_a_trust_region_is_refused():
    with pytest.raises(ValueError, match="with a kl_clip"):
        KFAC(nn.Linear(2, 2), kl_clip=None, kl_guard=2.0)
    with pytest.raises(ValueError, match="kl_guard_backtracks"):
        KFAC(nn.Linear(2, 2), kl_guard=2.0, kl_guard_backtracks=-1)


# -- every training path hands the guard its KL ------------------------------------------------
CLOSED = dict(kl_guard=1e-12, kl_guard_backtracks=0)  # no step can pass: each is undone


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _unchanged(before: list[torch.Tensor], module: nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("algo", ["acktr", "ppo_kfac", "ppo_kfac_lstm"])
def test_our_agents_guard_every_policy_step(tmp_path, algo):
    from agents.config import load_config
    from agents.trainer import Trainer

    name, lstm = algo.removesuffix("_lstm"), algo.endswith("_lstm")
    config = f"configs/{name}/cartpole{'_novel' if lstm else ''}.yaml"
    closed = [f"{k}={v}" for k, v in CLOSED.items()]
    small = ["n_envs=2", "n_steps=16", "total_timesteps=320", "batch_size=16", "vf_steps=0"]
    runs = {}
    for guard in ("closed", "open"):
        cfg = load_config(config, small + (closed if guard == "closed" else ["kl_guard=1e6"]))
        trainer = Trainer(cfg, tmp_path / guard, progress=False)
        before = _weights(trainer.policy)
        trainer.train()
        opt = trainer.algo.optimizer
        runs[guard] = (_unchanged(before, trainer.policy), opt.counters, opt.diagnostics)
    unchanged, counters, _ = runs["closed"]
    assert unchanged and counters["rejected_steps"] == counters["steps"] > 0
    unchanged, counters, diag = runs["open"]
    assert not unchanged and counters["rejected_steps"] == 0 and diag.step_kl > -1e-6


@pytest.mark.parametrize("kind", ["discrete", "box"])
@pytest.mark.parametrize("algo", ["ACKTR", "PPOKFAC", "RecurrentPPOKFAC"])
def test_the_sb3_classes_guard_every_step_sb3_takes(algo, kind):
    from stable_baselines3.common.env_util import make_vec_env

    import rl_kfac.sb3 as sb3

    env = make_vec_env("CartPole-v1" if kind == "discrete" else "Pendulum-v1", n_envs=2, seed=0)
    # a constant learning rate: the default decays to 0, and a step of lr 0 has KL 0
    small: dict = dict(n_steps=16, seed=0, device="cpu", learning_rate=0.25)
    if algo != "ACKTR":
        small.update(batch_size=16, n_epochs=2)
    if algo == "RecurrentPPOKFAC":
        small["policy_kwargs"] = dict(lstm_hidden_size=8)
    policy = "MlpLstmPolicy" if algo == "RecurrentPPOKFAC" else "MlpPolicy"
    for guard in ("closed", "open"):
        settings = CLOSED if guard == "closed" else dict(kl_guard=1e6)
        model = getattr(sb3, algo)(policy, env, **small, **settings)
        before = _weights(model.policy)
        model.learn(64)
        opt = model.policy.optimizer
        counters, diag = opt.counters, opt.diagnostics
        if guard == "closed":
            assert _unchanged(before, model.policy)
            assert counters["rejected_steps"] == counters["steps"] > 0
        else:
            assert not _unchanged(before, model.policy)
            assert counters["rejected_steps"] == 0 and diag.step_kl > -1e-6  # rounding
