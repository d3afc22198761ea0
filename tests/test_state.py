"""state_dict / deepcopy / pickle: the optimizer resumes exactly and its hooks follow the copy."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_kfac import KFAC


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(inplace=True), nn.Flatten())
        self.head = nn.Linear(3 * 3 * 3, 4)
        self.log_std = nn.Parameter(torch.zeros(4))  # owned by no layer

    def forward(self, x):
        return self.head(self.body(x)) * self.log_std.exp()


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 7, 7, generator=gen), torch.randint(0, 4, (8,), generator=gen))
        for _ in range(n)
    ]


def train(model, opt, data):
    for x, y in data:
        out = model(x)
        sampled = torch.distributions.Categorical(logits=out.detach()).sample()
        with opt.record_statistics():
            F.cross_entropy(out, sampled).backward(retain_graph=True)
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        opt.step()


def make(by_params=False):
    torch.manual_seed(0)
    model = Policy()
    target = model.parameters() if by_params else model
    return model, KFAC(target, lr=0.05, kl_clip=1e-2, inverse_update_interval=3)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("by_params", [False, True])
def test_state_dict_round_trip_continues_bit_for_bit(by_params):
    model, opt = make(by_params)
    data = batches(9)
    torch.manual_seed(1)
    train(model, opt, data[:4])  # resume in the middle of an inverse interval
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    rng = torch.get_rng_state()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = make(by_params)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.counters == opt.counters
    assert opt2.state_dict()["kfac"]["steps"].item() == 4

    torch.set_rng_state(rng)
    train(model, opt, data[4:])
    torch.set_rng_state(rng)
    train(model2, opt2, data[4:])
    assert params_equal(model, model2)
    w = model.head.weight
    for key in ("A", "G", "QA", "eA"):
        assert torch.equal(opt.state[w][key], opt2.state[model2.head.weight][key])
        assert opt2.state[model2.head.weight][key].dtype == torch.float32


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("by_params", [False, True])
def test_copies_keep_their_own_hooks(how, by_params):
    model, opt = make(by_params)
    data = batches(3)
    if by_params:  # also copy before the layers were found
        fresh_model, fresh_opt = make(by_params)
        fm, fo = copy.deepcopy((fresh_model, fresh_opt))
        train(fm, fo, data[:1])
        assert len(fo.blocks) == 2 and len(fresh_opt.blocks) == 0
    train(model, opt, data[:1])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    counters = dict(opt.counters)
    a = opt.state[model.head.weight]["A"].clone()

    torch.manual_seed(2)
    train(model2, opt2, data[1:])
    assert opt.counters == counters, "recording on the copy must not touch the original"
    assert torch.equal(opt.state[model.head.weight]["A"], a)
    assert opt2.counters["statistics_updates"] == 3

    torch.manual_seed(2)
    train(model, opt, data[1:])
    assert params_equal(model, model2)
