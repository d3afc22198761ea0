"""``statistics_rows``: factors from a uniform sample of rows, checked against independent math."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rl_kfac import KFAC
from rl_kfac.blocks import make_block
from rl_kfac.capture import Record
from rl_kfac.statistics import batch_factors
from tests.dense import patches_by_loop, with_ones


def conv_case(approx: str):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    a = torch.randn(6, 3, 9, 8, dtype=torch.float64)
    g = torch.randn_like(conv(a))
    return make_block(conv, "conv", True, approx), conv, a, g


def test_conv_expand_rows_at_are_the_patches_at_those_positions():
    block, conv, a, g = conv_case("expand")
    patches = patches_by_loop(a, conv)  # (N, R, D), built by loops over positions
    n, r, d = patches.shape
    index = torch.tensor([0, 7, r + 3, n * r - 1, 2 * r])
    x, y = block.rows_at(a, g, index)
    torch.testing.assert_close(x, with_ones(patches.reshape(n * r, d))[index], rtol=0, atol=0)
    grads = g.flatten(2).transpose(1, 2).reshape(n * r, -1)
    torch.testing.assert_close(y, grads[index], rtol=0, atol=0)
    assert block.row_count(g) == n * r
    # one unbatched image: a batch of 1, whichever path takes it
    assert block.grad_scale(g[0]) == block.grad_rows(g[0])[1] == 1.0
    assert block.row_count(g[0]) == r


def test_linear_and_reduce_rows_at_select_rows():
    block, _, a, g = conv_case("reduce")
    index = torch.tensor([4, 1])
    x, y = block.rows_at(a, g, index)
    full_x, _ = block.input_rows(a)
    full_y, _ = block.grad_rows(g)
    torch.testing.assert_close(x, full_x[index])
    torch.testing.assert_close(y, full_y[index])
    lin = nn.Linear(4, 3).double()
    h = torch.randn(5, 7, 4, dtype=torch.float64)  # leading dims expand into rows
    gl = torch.randn(5, 7, 3, dtype=torch.float64)
    lblock = make_block(lin, "fc", True, "expand")
    index = torch.tensor([0, 34, 12])
    x, y = lblock.rows_at(h, gl, index)
    torch.testing.assert_close(x, with_ones(h.reshape(35, 4))[index], rtol=0, atol=0)
    torch.testing.assert_close(y, gl.reshape(35, 3)[index], rtol=0, atol=0)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sampled_factors_are_unbiased(approx):
    """The mean over many draws approaches the full-row factors (A and G, with their scales)."""
    block, _, a, g = conv_case(approx)
    records = [Record(block, a, g)]
    full_a, full_g = batch_factors(records, torch.float64)[block]
    m = 8 if approx == "expand" else 3
    torch.manual_seed(1)
    draws = [batch_factors(records, torch.float64, max_rows=m)[block] for _ in range(3000)]
    mean_a = torch.stack([d[0] for d in draws]).mean(0)
    mean_g = torch.stack([d[1] for d in draws]).mean(0)
    assert (mean_a - full_a).norm() / full_a.norm() < 0.03
    assert (mean_g - full_g).norm() / full_g.norm() < 0.05
    one_a, _ = draws[0]
    assert (one_a - full_a).norm() / full_a.norm() > 0.05  # a single draw is a real estimate


def test_statistics_rows_above_the_row_count_changes_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    results = []
    for rows in (None, 32):
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        net.load_state_dict(model.state_dict())
        opt = KFAC(net, statistics_rows=rows)
        out = net(x)
        opt.fisher_backward(nn.functional.cross_entropy(out, torch.randint(0, 3, (32,))))
        out.square().mean().backward()
        opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*results):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="statistics_rows"):
        KFAC(model, statistics_rows=0)
