"""The trust-region radius controller: its rule, its state, and the closed loop in training."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from agents.config import load_config
from agents.trainer import Trainer
from rl_kfac import KFAC
from rl_kfac.actor_critic import adapt_kl_clip
from rl_kfac.trust_region import KLClipController


def test_the_radius_leaves_the_band_multiplicatively_and_stays_in_bounds():
    c = KLClipController(0.01, clip_max=0.1, factor=2.0, clip_min=1e-3)
    assert c.update(0.02, 0.03, clipped=True) == 0.01  # kl > 2·target: shrink
    assert c.update(0.02, 0.03, clipped=False) == 0.01  # whether or not the clip bound
    assert c.update(0.02, 0.004, clipped=True) == 0.04  # kl < target/2 after a clipped step
    assert c.update(0.02, 0.004, clipped=False) == 0.02  # an unclipped step: no wind-up
    assert c.update(0.02, 0.01, clipped=True) == 0.02  # inside the band: kept
    assert c.update(0.0015, 1.0, clipped=True) == 1e-3  # floor
    assert c.update(0.08, 0.0, clipped=True) == 0.1  # ceiling
    for bad in (math.nan, math.inf, -1.0):  # a skipped step measures nothing
        assert c.update(0.02, bad, clipped=True) == 0.02


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_kl": 0.0, "clip_max": 0.1},
        {"target_kl": math.nan, "clip_max": 0.1},
        {"target_kl": 0.01, "clip_max": 0.1, "factor": 1.0},
        {"target_kl": 0.01, "clip_max": 0.1, "clip_min": 0.2},
        {"target_kl": 0.01, "clip_max": math.nan},
        {"target_kl": 0.01, "clip_max": 0.1, "clip_min": 0.0},
    ],
)
def test_bad_controller_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        KLClipController(**kwargs)


def test_the_optimizer_keeps_a_set_radius_in_its_state_dict():
    def make():
        return KFAC(nn.Sequential(nn.Linear(3, 2)), lr=0.1, kl_clip=0.01)

    opt = make()
    opt.set_kl_clip(0.0025)
    other = make()
    other.load_state_dict(opt.state_dict())
    assert other.kl_clip == 0.0025
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="kl_clip"):
            opt.set_kl_clip(bad)
    unclipped = KFAC(nn.Sequential(nn.Linear(3, 2)), lr=0.1, kl_clip=None)
    with pytest.raises(ValueError, match="no trust region"):
        unclipped.set_kl_clip(0.01)
    unclipped.load_state_dict(opt.state_dict())  # no radius to restore: stays without one
    assert unclipped.kl_clip is None


@pytest.mark.parametrize(
    "overrides", [["kl_clip_target=0.001", "kl_clip=null"], ["kl_clip_target=-1"]]
)
def test_configs_refuse_a_target_without_a_radius_to_adapt(overrides):
    with pytest.raises(ValueError, match="kl_clip_target"):
        load_config("configs/acktr/cartpole.yaml", overrides)


def measured_kls(tmp_path, algo: str, overrides: list[str], updates: int = 100):
    """Each update's KL(π_old ‖ π_new) as the agent measures it (closed-form Gaussian KL on the
    batch, independent of K-FAC's model), and the radius after the last update."""
    torch.set_num_threads(1)
    cfg = load_config(
        f"configs/{algo}/pendulum.yaml",
        ["seed=3", "lr_schedule=constant", "damping_adaptation=none", *overrides],
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    kls = []
    for _ in range(updates):
        stats = trainer.algo.update(trainer.collector.collect(), 0.0)
        kls.append(float(stats["train/approx_kl"]))
        if cfg.kl_clip_target is not None:
            assert float(stats["kfac/kl_clip"]) == trainer.algo.optimizer.kl_clip
    trainer.close()
    return kls, trainer.algo.optimizer.kl_clip


@pytest.mark.parametrize("algo", ["acktr", "ppo_kfac"])
def test_the_closed_loop_brings_the_measured_kl_to_the_target(tmp_path, algo):
    """With a radius far too large for the target, a fixed radius overshoots the target KL
    several-fold; the controller shrinks the radius until the measured KL sits near the target,
    and never raises it above the configured one."""
    target = 0.002
    fixed, _ = measured_kls(tmp_path / "fixed", algo, ["kl_clip=0.3"])
    kls, radius = measured_kls(
        tmp_path / "adapted", algo, ["kl_clip=0.3", f"kl_clip_target={target}"]
    )
    assert np.median(fixed[-20:]) > 4 * target  # the problem is real here ...
    assert target / 3 < np.median(kls[-20:]) < 3 * target, kls  # ... and the loop solves it
    assert radius < 0.3 / 10


def one_clipped_step(kl_clip_lr: str, lr: float, host_sync: str = "step") -> torch.Tensor:
    """The parameter change of one K-FAC step made at initial rate 0.5 and taken at ``lr`` (as
    a schedule sets it), on a batch whose step the clip shortens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = KFAC(
        model,
        lr=0.5,
        momentum=0.0,
        kl_clip=1e-4,
        kl_clip_lr=kl_clip_lr,
        host_sync=host_sync,
        factor_dtype=torch.float64,
    )
    for group in opt.param_groups:
        group["lr"] = lr
    x = torch.randn(64, 4, dtype=torch.float64)
    out = model(x)
    sampled = torch.distributions.Categorical(logits=out.detach()).sample()
    opt.fisher_backward(nn.functional.cross_entropy(out, sampled))
    opt.zero_grad()
    nn.functional.cross_entropy(out, torch.randint(0, 3, (64,))).backward()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt.step()
    assert opt.diagnostics.step_scale < 0.2, "the test needs a clip that binds at lr 0.5"
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_kl_clip_lr_decides_whether_a_schedule_shortens_clipped_steps(host_sync):
    """A clipped step is ``η ν v`` with ``ν = sqrt(c / (η_clip² ⟨v, g⟩))``. With η_clip the
    current rate (ACKTR's) its length ``sqrt(c / ⟨v, g⟩)`` is the same at any rate; with η_clip
    the initial rate the step is the initial rate's, scaled by ``η / η₀``."""
    full = one_clipped_step("current", 0.5, host_sync)
    torch.testing.assert_close(one_clipped_step("current", 0.125, host_sync), full)
    torch.testing.assert_close(one_clipped_step("initial", 0.5, host_sync), full)
    torch.testing.assert_close(one_clipped_step("initial", 0.125, host_sync), full / 4)
    with pytest.raises(ValueError, match="kl_clip_lr"):
        KFAC(nn.Sequential(nn.Linear(3, 2)), kl_clip_lr="final")


def test_the_radius_controller_compares_the_kl_at_the_initial_rate():
    """Under ``kl_clip_lr="initial"`` a schedule at a quarter of the initial rate shrinks the
    step's KL 16-fold; the controller must judge the radius by the KL at the initial rate
    (here 16 x 0.001 > 2 x target: shrink), not widen it because the decayed step is short."""
    opt = KFAC(nn.Sequential(nn.Linear(3, 2)), lr=0.4, kl_clip=0.01, kl_clip_lr="initial")
    opt._last = (0.5, 1.0)  # the last step was clipped (ν < 1)
    control = KLClipController(0.005, clip_max=0.01)
    for group in opt.param_groups:
        group["lr"] = 0.1
    assert opt.lr_fraction == 0.25
    assert adapt_kl_clip(opt, control, 0.001) == pytest.approx(0.01 / 1.5)
    current = KFAC(nn.Sequential(nn.Linear(3, 2)), lr=0.4, kl_clip=0.004)
    current._last = (0.5, 1.0)
    for group in current.param_groups:
        group["lr"] = 0.1
    assert current.lr_fraction == 1.0
    assert adapt_kl_clip(current, control, 0.001) == pytest.approx(0.004 * 1.5)  # < target/2
    for group in opt.param_groups:
        group["lr"] = 0.0  # the schedule's end: no step, the radius is kept
    assert adapt_kl_clip(opt, control, 0.0) == opt.kl_clip


def _plain_step(own: float | None, host_sync: str) -> tuple[torch.Tensor, ...]:
    """One step on three parameters owned by no layer, preconditioned exactly by
    ``fisher_diagonal`` f: ``v = g / (f + λ)``. Groups 0 and 2 share the optimizer's trust region;
    group 1 has its own radius ``own`` (no key: it shares too)."""
    params = [nn.Parameter(torch.zeros(4)) for _ in range(3)]
    grads = [torch.full((4,), 1.0), torch.full((4,), 30.0), torch.full((4,), 2.0)]
    middle: dict = {"params": [params[1]], "fisher_diagonal": 1.0}
    if own is not None:
        middle["kl_clip"] = own
    groups = [{"params": [params[0]], "fisher_diagonal": 1.0}, middle]
    groups.append({"params": [params[2]], "fisher_diagonal": 1.0})
    opt = KFAC(groups, lr=0.5, momentum=0.0, damping=1.0, kl_clip=0.01, host_sync=host_sync)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return tuple(p.detach().clone() for p in params)


@pytest.mark.parametrize("host_sync", ["step", "log"])
@pytest.mark.parametrize("own", [None, 1e-4, math.inf])
def test_a_group_with_its_own_kl_clip_is_scaled_by_its_own_nu(own, host_sync):
    """By hand: v = g / 2, ⟨v, g⟩ = |g|² / 2, ν = min(1, sqrt(c / (η² Σ⟨v, g⟩))) per region."""
    lr, c = 0.5, 0.01
    q = [4 * 1.0**2 / 2, 4 * 30.0**2 / 2, 4 * 2.0**2 / 2]  # 2, 1800, 8

    def nu(radius: float, quads: list[float]) -> float:
        return min(1.0, math.sqrt(radius / (lr**2 * sum(quads))))

    if own is None:
        scales = [nu(c, q)] * 3
    else:
        shared = nu(c, [q[0], q[2]])
        scales = [shared, 1.0 if own == math.inf else nu(own, [q[1]]), shared]
    got = _plain_step(own, host_sync)
    for g, scale, p in zip((1.0, 30.0, 2.0), scales, got):
        torch.testing.assert_close(p, torch.full((4,), -lr * scale * g / 2))


def test_a_bad_group_kl_clip_is_refused():
    for bad in (0.0, -1.0, "x"):
        with pytest.raises(ValueError, match="a group's kl_clip"):
            KFAC([{"params": [nn.Parameter(torch.zeros(2))], "kl_clip": bad}])


def test_vf_kl_clip_puts_exactly_the_value_only_parameters_in_a_group_of_their_own():
    from rl_kfac.sb3 import PPOKFAC

    model = PPOKFAC("MlpPolicy", "CartPole-v1", vf_kl_clip=0.5, device="cpu")
    names = {id(p): n for n, p in model.policy.named_parameters()}
    groups = model.policy.optimizer.param_groups
    (critic,) = [g for g in groups if "kl_clip" in g]
    assert critic["kl_clip"] == 0.5
    assert sorted(names[id(p)] for p in critic["params"]) == sorted(
        n for n in names.values() if n.startswith(("mlp_extractor.value_net.", "value_net."))
    )
    shared = [names[id(p)] for g in groups if "kl_clip" not in g for p in g["params"]]
    assert shared and not any("value" in n for n in shared)
    paper = PPOKFAC("MlpPolicy", "CartPole-v1", vf_kl_clip=None, device="cpu")
    assert [sorted(g) for g in paper.policy.optimizer.param_groups] == [
        sorted(groups[0])
    ]  # one group, the policy's trust region for all


def test_our_agents_vf_kl_clip_groups_the_critic():
    cfg = load_config("configs/acktr/cartpole.yaml", ["vf_kl_clip=.inf", "n_envs=2"])
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()) / "run", progress=False)
    groups = trainer.algo.optimizer.param_groups
    critic = {id(p) for p in trainer.policy.value_parameters()}
    (own,) = [g for g in groups if "kl_clip" in g]
    assert own["kl_clip"] == math.inf and {id(p) for p in own["params"]} == critic
    trainer.envs.close()
