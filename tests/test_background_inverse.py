"""inverse_mode="background": eigendecompositions from a copy of step k's factors, in a worker
thread, swapped in at step k+1; deterministic, so checkpoints and copies resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_kfac import KFAC
from rl_kfac.curvature import symmetric_eig


def net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def update(model: nn.Module, opt: KFAC, k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    x = torch.randn(32, 5, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    out = model(x)
    sampled = torch.multinomial(out.detach().softmax(-1), 1, generator=gen).squeeze(1)
    opt.fisher_backward(F.cross_entropy(out, sampled))
    opt.zero_grad()
    F.cross_entropy(out, y).backward()


def test_eigenbases_come_from_the_previous_due_step():
    torch.manual_seed(0)
    model = net()
    opt = KFAC(model, inverse_update_interval=3, inverse_mode="background")
    first = model[0].weight
    state = opt.state[first]
    snapshots = {}
    for k in range(8):
        update(model, opt, k)
        snapshots[k] = state["A"].clone()  # what step k decomposes, if due
        before = state.get("QA")
        before = None if before is None else before.clone()
        opt.step()
        if k == 0:  # a new layer: decomposed at once
            torch.testing.assert_close(state["QA"], symmetric_eig(snapshots[0])[1], rtol=0, atol=0)
        elif k % 3 == 0:  # due: started in the background, the old basis still in use
            assert torch.equal(state["QA"], before)
        elif k % 3 == 1 and k > 1:  # swapped in: step k-1's factors
            eig = symmetric_eig(snapshots[k - 1])
            assert torch.equal(state["eA"], eig[0]) and torch.equal(state["QA"], eig[1])
    assert opt.counters["inverse_updates"] == 3  # steps 0, 3 (landed at 4), 6 (landed at 7)


@pytest.mark.parametrize("via", ["state_dict", "deepcopy"])
def test_a_checkpoint_with_a_decomposition_in_flight_resumes_exactly(via):
    torch.manual_seed(1)
    model = net()
    opt = KFAC(model, inverse_update_interval=2, inverse_mode="background")
    for k in range(5):  # step 4 is due: its decomposition is in flight afterwards
        update(model, opt, k)
        opt.step()
    if via == "state_dict":
        model2 = net()
        model2.load_state_dict(model.state_dict())
        opt2 = KFAC(model2, inverse_update_interval=2, inverse_mode="background")
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a file would
    else:
        model2, opt2 = copy.deepcopy((model, opt))
    for k in range(5, 9):
        for m, o in ((model, opt), (model2, opt2)):
            update(m, o, k)
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.counters == opt2.counters


def test_background_mode_is_checked():
    with pytest.raises(ValueError, match="inverse_mode"):
        KFAC(net(), inverse_mode="async")
    assert "inverse_mode='background'" in repr(KFAC(net(), inverse_mode="background"))
