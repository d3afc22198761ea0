"""``host_sync="log"``: the step's ν, skip decision and counters stay on the device. Checked on
the CPU against the host-side step (``"step"``), which the dense-oracle tests verify."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_kfac import KFAC


def model_and_data(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model.log_std = nn.Parameter(torch.zeros(3))  # a plain-gradient parameter too
    model.double()  # float64: the comparison sees the step's logic, not rounding amplified
    gen = torch.Generator().manual_seed(seed + 1)
    data = [
        (
            torch.randn(32, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (32,), generator=gen),
            torch.randint(0, 3, (32,), generator=gen),
        )
        for _ in range(12)
    ]
    return model, data


def optimizer(model: nn.Module, host_sync: str, **kwargs) -> KFAC:
    groups = [
        {"params": list(model[0].parameters()), "weight_decay": 1e-3},
        {"params": [*model[2].parameters(), model.log_std], "lr": 0.1},
    ]
    return KFAC(
        groups, inverse_update_interval=3, host_sync=host_sync, factor_dtype=torch.float64, **kwargs
    )


def train(
    host_sync: str, poison: set[int] = frozenset(), steps: int = 12, **kwargs
) -> tuple[nn.Module, KFAC]:
    model, data = model_and_data()
    opt = optimizer(model, host_sync, **kwargs)
    for i, (x, y, sampled) in enumerate(data[:steps]):
        out = model(x) + model.log_std
        opt.fisher_backward(F.cross_entropy(out, sampled))
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        if i in poison:
            model[2].weight.grad[0, 0] = float("nan")
        opt.step()
    return model, opt


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("kl_clip", [1e-3, None])
def test_device_side_step_matches_host_step(momentum, kl_clip):
    host, opt_host = train("step", momentum=momentum, kl_clip=kl_clip)
    dev, opt_dev = train("log", momentum=momentum, kl_clip=kl_clip)
    for p, q in zip(host.parameters(), dev.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    a, b = opt_host.diagnostics, opt_dev.diagnostics
    assert a.step_scale == pytest.approx(b.step_scale, rel=1e-10)
    assert a.quadratic == pytest.approx(b.quadratic, rel=1e-10)
    assert opt_host.counters == opt_dev.counters


def test_a_non_finite_step_changes_nothing_and_is_counted_when_read():
    model, opt = train("log", momentum=0.9, poison={11})  # the last step is poisoned
    eleven, _ = train("log", momentum=0.9, steps=11)
    for p, q in zip(eleven.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # it moved nothing
    assert opt._skipped_steps.pending  # not read yet: no host round trip was taken
    with pytest.warns(RuntimeWarning, match="K-FAC step skipped"):
        assert opt.counters["skipped_steps"] == 1
    assert opt.counters["steps"] == 12
    assert math.isnan(opt.diagnostics.step_scale)


def test_non_finite_statistics_keep_the_factors_on_the_device():
    model, data = model_and_data()
    opt = KFAC(model, host_sync="log", factor_dtype=torch.float64)
    x, _, sampled = data[0]
    opt.fisher_backward(F.cross_entropy(model(x), sampled))
    opt.step()
    before = [opt.state[b.weight]["A"].clone() for b in opt.blocks]
    bad = x.clone()
    bad[0, 0] = float("inf")
    opt.fisher_backward(F.cross_entropy(model(bad), sampled))
    opt.step()
    for block, a in zip(opt.blocks, before):
        assert torch.equal(opt.state[block.weight]["A"], a)
    with pytest.warns(RuntimeWarning, match="statistics skipped"):
        counters = opt.counters
    assert counters["skipped_statistics"] == 1
    assert counters["statistics_updates"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_carries_the_device_counters():
    _, opt = train("log", poison={4})
    with pytest.warns(RuntimeWarning):
        sd = opt.state_dict()
    fresh = optimizer(model_and_data()[0], "log")
    fresh.load_state_dict(sd)
    assert fresh.counters["skipped_steps"] == 1


def test_host_sync_is_validated():
    with pytest.raises(ValueError, match="host_sync"):
        KFAC(nn.Linear(2, 2), host_sync="never")
