"""Numerics that must never produce NaN parameters, argument validation, hook scoping, intervals."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_kfac import KFAC
from tests.dense import damped_solve_pi

pytestmark = pytest.mark.usefixtures("float64")


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def record_and_step(model, opt, x, grad_fill=None):
    out = model(x)
    with opt.record_statistics():
        F.cross_entropy(out, out.detach().argmax(-1)).backward(retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long)).backward()
    if grad_fill is not None:
        model[0].weight.grad[0, 0] = grad_fill
    opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_skips_step_and_warns_once(bad):
    torch.manual_seed(0)
    model = net()
    opt = KFAC(model, lr=0.1)
    x = torch.randn(16, 4)
    record_and_step(model, opt, x)  # a good step: factors and momentum exist
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="skipped"):
        record_and_step(model, opt, x, grad_fill=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second bad step is counted but not warned again
        record_and_step(model, opt, x, grad_fill=bad)
    assert opt.counters["skipped_steps"] == 2
    for p, b, m in zip(model.parameters(), before, bufs):
        assert torch.equal(p.detach(), b)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert opt.counters["statistics_updates"] == 3  # the statistics were fine: folded in
    record_and_step(model, opt, x)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.diagnostics.skipped_steps == 2


def test_non_finite_statistics_are_skipped_and_factors_kept():
    torch.manual_seed(1)
    model = net()
    opt = KFAC(model)
    record_and_step(model, opt, torch.randn(8, 4))
    a_before = opt.state[model[0].weight]["A"].clone()
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    out = model(x)
    with pytest.warns(RuntimeWarning, match="statistics"), opt.record_statistics():
        F.cross_entropy(out, torch.zeros(8, dtype=torch.long)).backward()
    assert opt.counters["skipped_statistics"] == 1
    assert torch.equal(opt.state[model[0].weight]["A"], a_before)


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_all_zero_and_rank_deficient_factors(mode):
    torch.manual_seed(2)
    lin = nn.Linear(4, 3, bias=False)
    opt = KFAC(
        lin,
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        damping=0.1,
        damping_mode=mode,
        factor_dtype=torch.float64,
    )
    s = lin(torch.zeros(5, 4))  # A = 0 and G = 0 (zero gradient at zero input)
    with opt.record_statistics():
        (0.0 * s.sum()).backward()
    assert torch.count_nonzero(opt.state[lin.weight]["A"]) == 0
    assert torch.count_nonzero(opt.state[lin.weight]["G"]) == 0
    x = torch.randn(5, 4)
    (lin(x) ** 2).mean().backward()
    g = lin.weight.grad.clone()
    before = lin.weight.detach().clone()
    opt.step()
    delta = lin.weight.detach() - before
    if mode == "exact":
        expected = -g / 0.1  # every eigenvalue is 0, so D = λ
    else:  # π falls back to 1 when a factor has no trace
        r = 0.1**0.5
        expected = -torch.linalg.inv(torch.full((3, 3), 0.0) + r * torch.eye(3)) @ g / r
    torch.testing.assert_close(delta, expected)

    # rank one A (a single datum) against the dense damped inverse
    opt2 = KFAC(
        lin,
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        damping=0.1,
        damping_mode="pi",
        factor_dtype=torch.float64,
    )
    x1 = torch.randn(1, 4)
    s = lin(x1)
    s.retain_grad()
    with opt2.record_statistics():
        (0.5 * (s - torch.randn(1, 3)).pow(2).sum()).backward()
    a_f, g_f = x1.T @ x1, s.grad.T @ s.grad
    lin.zero_grad()
    (lin(x) ** 2).mean().backward()
    m = lin.weight.grad.clone()
    before = lin.weight.detach().clone()
    opt2.step()
    expected = -damped_solve_pi(a_f, g_f, m, 0.1)
    torch.testing.assert_close(lin.weight.detach() - before, expected)


def test_eigh_falls_back_to_float64_then_keeps_last_basis(monkeypatch):
    torch.manual_seed(3)
    model = net()
    opt = KFAC(model, inverse_update_interval=1)  # float32 factors
    real_eigh = torch.linalg.eigh
    calls = {"f32": 0, "f64": 0}

    def flaky(mat):
        key = "f64" if mat.dtype == torch.float64 else "f32"
        calls[key] += 1
        if key == "f32":
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return real_eigh(mat)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    record_and_step(model, opt, torch.randn(8, 4))
    assert calls["f64"] > 0 and opt.counters["eig_failures"] == 0
    q_before = opt.state[model[0].weight]["QA"].clone()
    assert q_before.dtype == torch.float32

    def broken(mat):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="kept last basis"):
        record_and_step(model, opt, torch.randn(8, 4) * 3)
    assert opt.counters["eig_failures"] >= 1
    assert torch.equal(opt.state[model[0].weight]["QA"], q_before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_random_corruption_never_reaches_parameters():
    torch.manual_seed(4)
    model = net()
    opt = KFAC(model, lr=0.5)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(30):
            x = torch.randn(8, 4, generator=gen)
            if i % 4 == 1:
                x[0, 0] = float("inf")
            fill = float("nan") if i % 5 == 2 else None
            record_and_step(model, opt, x, grad_fill=fill)
            assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.counters["skipped_steps"] > 0 and opt.counters["skipped_statistics"] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": -1.0},
        {"momentum": 1.0},
        {"stat_decay": 1.0},
        {"damping": 0.0},
        {"kl_clip": 0.0},
        {"weight_decay": -0.1},
        {"factor_update_interval": 0},
        {"inverse_update_interval": 2.5},
        {"damping_mode": "tikhonov"},
        {"conv_approx": "mean"},
        {"factor_dtype": torch.int32},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KFAC(net(), **kwargs)


@pytest.mark.parametrize("value", [0.0, -2.0, float("inf"), float("nan"), "2", True])
def test_invalid_fisher_diagonal_raises_value_error(value):
    model = net()
    *rest, last = model.parameters()
    with pytest.raises(ValueError, match="fisher_diagonal"):
        KFAC([{"params": rest}, {"params": [last], "fisher_diagonal": value}])


def test_model_must_own_exactly_the_parameters():
    model, extra = net(), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="model= must own exactly"):
        KFAC([*model.parameters(), extra], model=model)
    with pytest.raises(ValueError, match="model= must own exactly"):
        KFAC(list(model.parameters())[1:], model=model)
    with pytest.raises(ValueError, match="model= goes with parameter groups"):
        KFAC(model, model=model)
    named = KFAC([{"params": list(model.parameters())}], model=model)
    assert [b.name for b in named.blocks] == [b.name for b in KFAC(model).blocks]


def test_statistics_only_inside_the_context():
    torch.manual_seed(5)
    model = net()
    opt = KFAC(model)
    x = torch.randn(8, 4)
    with torch.no_grad():
        model(x)  # a rollout
    with opt.record_statistics():
        pass
    assert opt.counters["statistics_updates"] == 0
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()  # ordinary loss
    assert "A" not in opt.state[model[0].weight]
    record_and_step(model, opt, x)
    a = opt.state[model[0].weight]["A"].clone()
    with torch.no_grad():
        model(torch.randn(8, 4) * 10)
    opt.zero_grad()
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    assert torch.equal(opt.state[model[0].weight]["A"], a)
    assert opt.counters["statistics_updates"] == 1


def test_update_intervals():
    torch.manual_seed(6)
    model = net()
    opt = KFAC(model, factor_update_interval=2, inverse_update_interval=3)
    bases = []
    for _ in range(7):
        record_and_step(model, opt, torch.randn(8, 4))
        bases.append(opt.state[model[0].weight]["QA"].clone())
    assert opt.counters["statistics_updates"] == 4  # steps 0, 2, 4, 6
    assert opt.counters["inverse_updates"] == 3  # steps 0, 3, 6
    changed = [not torch.equal(bases[i], bases[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]


def test_grouped_conv_falls_back_to_plain_gradient():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 9, 2))
    with pytest.warns(RuntimeWarning, match="groups=2"):  # when the model is given
        opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
    assert [type(b).__name__ for b in opt.blocks] == ["LinearBlock"]
    x = torch.randn(4, 2, 5, 5)
    out = model(x)
    with opt.record_statistics():
        F.cross_entropy(out, torch.ones(4, dtype=torch.long)).backward(retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(out, torch.zeros(4, dtype=torch.long)).backward()
    g = model[0].weight.grad.clone()
    before = model[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach() - before, -0.1 * g)


class TwoTrunks(nn.Module):
    """Actor and critic trunks; the critic sits behind an untracked input scale."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.pi = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
        self.vf = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.pi(x), self.vf(x * self.scale).squeeze(-1)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("by_params", [False, True])
def test_fisher_backward_equals_recorded_backward_and_leaves_grads(by_params, inplace):
    torch.manual_seed(8)
    x = torch.randn(16, 4)
    sampled = torch.randint(0, 3, (16,))
    noise = torch.randn(16)
    factors = []
    for fast in (False, True):
        torch.manual_seed(9)
        model = TwoTrunks(inplace)
        opt = KFAC(model.parameters() if by_params else model, factor_dtype=torch.float64)
        logits, value = model(x)
        fisher = (
            F.cross_entropy(logits, sampled)
            + 0.5 * (value - (value.detach() + noise)).pow(2).mean()
        )
        if fast:
            opt.fisher_backward(fisher)
            assert all(p.grad is None for p in model.parameters())
        else:
            with opt.record_statistics():
                fisher.backward()
        factors.append(
            {b.name: (opt.state[b.weight]["A"], opt.state[b.weight]["G"]) for b in opt.blocks}
        )
    slow, fast = factors
    assert len(fast) == 4 and fast.keys() == slow.keys()
    for name in slow:
        torch.testing.assert_close(fast[name][0], slow[name][0])
        torch.testing.assert_close(fast[name][1], slow[name][1])


def test_fisher_backward_respects_factor_update_interval():
    torch.manual_seed(10)
    model = net()
    opt = KFAC(model, factor_update_interval=2)
    for _ in range(4):
        out = model(torch.randn(8, 4))
        due = opt.statistics_due
        before = opt.counters["statistics_updates"]
        opt.fisher_backward(F.cross_entropy(out, out.detach().argmax(-1)))
        assert opt.counters["statistics_updates"] == before + int(due)
        opt.zero_grad()
        F.cross_entropy(out, torch.zeros(8, dtype=torch.long)).backward()
        opt.step()
    assert opt.counters["statistics_updates"] == 2


def test_parameter_mode_discovers_layers_then_drops_the_global_hook():
    from torch.nn.modules import module as module_mod

    torch.manual_seed(11)
    model = net()
    before = len(module_mod._global_forward_hooks)
    opt = KFAC(model.parameters())
    assert len(module_mod._global_forward_hooks) == before + 1
    assert opt.blocks == []
    with torch.no_grad():
        model(torch.randn(2, 4))  # a rollout is enough to find the layers
    assert [b.module for b in opt.blocks] == [model[0], model[2]]
    record_and_step(model, opt, torch.randn(8, 4))
    assert len(module_mod._global_forward_hooks) == before
    assert opt.counters["statistics_updates"] == 1
