"""One K-FAC step against a dense (A ⊗ G + λI)⁻¹ g from independently captured activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_kfac import KFAC
from tests.dense import (
    damped_solve_exact,
    damped_solve_pi,
    factors_linear,
    layer_matrix,
    patches_by_loop,
    with_ones,
)

pytestmark = pytest.mark.usefixtures("float64")
LR, DAMPING = 0.3, 1e-2
SOLVE = {"exact": damped_solve_exact, "pi": damped_solve_pi}


def exact_opts(model_or_params, **kw):
    base = dict(
        lr=LR,
        momentum=0.0,
        kl_clip=None,
        weight_decay=0.0,
        damping=DAMPING,
        inverse_update_interval=1,
        factor_dtype=torch.float64,
    )
    base.update(kw)
    return KFAC(model_or_params, **base)


class MLP(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 4)
        self.act = nn.ReLU(inplace=True) if inplace else nn.Tanh()

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(self.act(self.l1(x)))))

    def reference(self, x):
        """Same function, out-of-place, returning pre-activations that retain their grad."""
        s1 = self.l1(x)
        h1 = torch.relu(s1) if isinstance(self.act, nn.ReLU) else torch.tanh(s1)
        s2 = self.l2(h1)
        s3 = self.l3(torch.tanh(s2))
        return s3, [(x, s1), (h1, s2), (torch.tanh(s2), s3)]


def losses(logits, targets, labels):
    fisher = F.cross_entropy(logits, targets)
    loss = F.cross_entropy(logits, labels) + 0.1 * logits.pow(2).mean()
    return fisher, loss


def kfac_step(model, opt, x, targets, labels):
    fisher, loss = losses(model(x), targets, labels)
    with opt.record_statistics():
        fisher.backward(retain_graph=True)
    opt.zero_grad()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("mode", ["exact", "pi"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("by_params", [False, True])
def test_mlp_step_equals_dense_damped_inverse(mode, inplace, by_params):
    torch.manual_seed(0)
    model = MLP(inplace)
    x = torch.randn(32, 5)
    targets, labels = torch.randint(0, 4, (32,)), torch.randint(0, 4, (32,))
    opt = exact_opts(model.parameters() if by_params else model, damping_mode=mode)

    # reference first (the step changes the weights)
    logits, pairs = model.reference(x)
    for _, s in pairs:
        s.retain_grad()
    fisher, loss = losses(logits, targets, labels)
    fisher.backward(retain_graph=True)
    factors = [factors_linear(a.detach(), s.grad) for a, s in pairs]
    layers = [model.l1, model.l2, model.l3]
    grads = torch.autograd.grad(loss, [p for m in layers for p in (m.weight, m.bias)])
    expected = []
    for i, (a_f, g_f) in enumerate(factors):
        m = layer_matrix(grads[2 * i], grads[2 * i + 1])
        expected.append(-LR * SOLVE[mode](a_f, g_f, m, DAMPING))
    model.zero_grad()

    deltas = kfac_step(model, opt, x, targets, labels)
    for i in range(3):
        got = layer_matrix(deltas[2 * i], deltas[2 * i + 1])
        torch.testing.assert_close(got, expected[i], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("by_params", [False, True])
def test_empirical_statistics_come_from_the_training_loss(by_params):
    """statistics='empirical': G from the same loss's gradient, no record_statistics() needed."""
    torch.manual_seed(3)
    model = MLP(False)
    x, labels = torch.randn(24, 5), torch.randint(0, 4, (24,))
    opt = exact_opts(model.parameters() if by_params else model, statistics="empirical")

    logits, pairs = model.reference(x)
    for _, s in pairs:
        s.retain_grad()
    loss = losses(logits, labels, labels)[1]
    loss.backward()
    layers = [model.l1, model.l2, model.l3]
    expected = []
    for layer, (a, s) in zip(layers, pairs):
        a_f, g_f = factors_linear(a.detach(), s.grad)
        m = layer_matrix(layer.weight.grad, layer.bias.grad)
        expected.append(-LR * damped_solve_exact(a_f, g_f, m, DAMPING))
    model.zero_grad()

    before = [layer_matrix(m.weight, m.bias).detach().clone() for m in layers]
    with torch.no_grad():  # a rollout forward: records nothing
        model(torch.randn(7, 5))
    losses(model(x), labels, labels)[1].backward()
    opt.step()
    assert opt.counters["statistics_updates"] == 1
    for layer, b, e in zip(layers, before, expected):
        got = layer_matrix(layer.weight, layer.bias).detach() - b
        torch.testing.assert_close(got, e, rtol=1e-7, atol=1e-10)


class RepeatedMiddle(nn.Module):
    """An MLP whose middle layer is applied ``calls`` times per forward pass."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 4)
        self.calls = calls

    def forward(self, x):
        return self.reference(x)[0]

    def reference(self, x):
        """Logits and, per call, (layer, input, pre-activation) with the pre-activations kept."""
        calls = []
        h = x
        for layer in (self.l1, *[self.l2] * self.calls, self.l3):
            s = layer(h)
            calls.append((layer, h, s))
            h = torch.tanh(s)
        return s, calls


@pytest.mark.parametrize("calls", [1, 2])
def test_running_factors_equal_their_definition_for_every_layer(calls):
    """m_1 = F_1, m_k = d·m_{k-1} + (1-d)·F_k for A and G of every layer, F_k the batch
    factors (a layer called C times: the mean of its C per-call factors), from activations and
    output gradients taken with autograd here."""
    torch.manual_seed(1)
    model, decay = RepeatedMiddle(calls), 0.7
    opt = exact_opts(model, stat_decay=decay)
    layers = [model.l1, model.l2, model.l3]
    expected: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for _ in range(4):
        x, targets = torch.randn(16, 5), torch.randint(0, 4, (16,))
        logits, calls = model.reference(x)
        outs = [s for _, _, s in calls]
        grads = torch.autograd.grad(F.cross_entropy(logits, targets), outs)
        for layer in layers:
            mine = [
                factors_linear(h.detach(), g)
                for (lay, h, _), g in zip(calls, grads)
                if lay is layer
            ]
            new = [sum(f[i] for f in mine) / len(mine) for i in (0, 1)]
            old = expected.get(layer)
            if old is not None:
                new = [decay * m + (1 - decay) * n for m, n in zip(old, new)]
            expected[layer] = (new[0], new[1])
        with opt.record_statistics():
            F.cross_entropy(model(x), targets).backward()
    for layer in layers:
        state = opt.state[layer.weight]
        torch.testing.assert_close(state["A"], expected[layer][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["G"], expected[layer][1], rtol=1e-12, atol=1e-12)


def test_linear_with_leading_dims_expands_into_rows():
    torch.manual_seed(2)
    lin = nn.Linear(3, 2)
    opt = exact_opts(lin)
    x = torch.randn(4, 5, 3)  # batch 4, 5 positions sharing the weight
    s = lin(x)
    target = torch.randn(4, 5, 2)
    fisher = 0.5 * (s - target).pow(2).sum(dim=(1, 2)).mean()
    s.retain_grad()
    with opt.record_statistics():
        fisher.backward()
    rows_a = with_ones(x.reshape(20, 3))
    g = s.grad.reshape(20, 2)
    torch.testing.assert_close(opt.state[lin.weight]["A"], rows_a.T @ rows_a / 20)
    torch.testing.assert_close(opt.state[lin.weight]["G"], 4 * g.T @ g)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 5, 2, dilation=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    def reference(self, x):
        s1 = self.c1(x)
        h1 = torch.relu(s1)
        s2 = self.c2(h1)
        h2 = torch.relu(s2).flatten(1)
        s3 = self.fc(h2)
        return s3, [(x, s1), (h1, s2), (h2, s3)]


def conv_factors(a, s, conv, approx):
    patches = patches_by_loop(a, conv)  # (N, R, D)
    n, r, d = patches.shape
    g = s.grad.flatten(2).transpose(1, 2)  # (N, R, O)
    if approx == "expand":
        rows = with_ones(patches.reshape(n * r, d))
        gr = g.reshape(n * r, -1)
        return rows.T @ rows / (n * r), n * gr.T @ gr
    rows = with_ones(patches.mean(dim=1))
    gs = g.sum(dim=1)
    return rows.T @ rows / n, n * gs.T @ gs


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_cnn_step_equals_dense_damped_inverse(approx, mode):
    torch.manual_seed(3)
    model = CNN()
    x = torch.randn(6, 3, 8, 8)
    targets, labels = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    opt = exact_opts(model, damping_mode=mode, conv_approx=approx)

    logits, pairs = model.reference(x)
    for _, s in pairs:
        s.retain_grad()
    fisher, loss = losses(logits, targets, labels)
    fisher.backward(retain_graph=True)
    factors = [
        conv_factors(pairs[0][0], pairs[0][1], model.c1, approx),
        conv_factors(pairs[1][0].detach(), pairs[1][1], model.c2, approx),
        factors_linear(pairs[2][0].detach(), pairs[2][1].grad),
    ]
    layers = [model.c1, model.c2, model.fc]
    grads = torch.autograd.grad(loss, [p for m in layers for p in (m.weight, m.bias)])
    model.zero_grad()

    deltas = kfac_step(model, opt, x, targets, labels)
    for i, (a_f, g_f) in enumerate(factors):
        torch.testing.assert_close(opt.state[layers[i].weight]["A"], a_f)
        torch.testing.assert_close(opt.state[layers[i].weight]["G"], g_f)
        m = layer_matrix(grads[2 * i], grads[2 * i + 1])
        expected = -LR * SOLVE[mode](a_f, g_f, m, DAMPING)
        got = layer_matrix(deltas[2 * i], deltas[2 * i + 1])
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_padding_modes_and_same_padding(padding_mode):
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding="same", padding_mode=padding_mode)
    opt = exact_opts(conv)
    x = torch.randn(2, 2, 5, 5)
    s = conv(x)
    s.retain_grad()
    with opt.record_statistics():
        (0.5 * (s - torch.randn_like(s)).pow(2).sum((1, 2, 3)).mean()).backward()
    xp = F.pad(x, (1, 1, 1, 1), mode=padding_mode)
    plain = nn.Conv2d(2, 3, 3, padding=0)
    patches = patches_by_loop(xp, plain).reshape(-1, 18)
    rows = with_ones(patches)
    torch.testing.assert_close(opt.state[conv.weight]["A"], rows.T @ rows / rows.shape[0])


@pytest.mark.parametrize("fisher_diagonal", [None, 2.0])
def test_trust_region_clip_scales_the_whole_step_including_plain_params(fisher_diagonal):
    """A parameter owned by no layer takes the plain gradient, or with ``fisher_diagonal=f`` in
    its group the exact solve against f·I + λI; either way it counts in ν."""
    torch.manual_seed(5)
    model = MLP(False)
    log_scale = nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.0]))  # owned by no layer
    kl_clip = 1e-4
    params = [*model.parameters(), log_scale]
    groups = [{"params": params[:-1]}, {"params": [log_scale], "fisher_diagonal": fisher_diagonal}]
    opt = exact_opts(groups, kl_clip=kl_clip)
    x = torch.randn(32, 5)
    targets, labels = torch.randint(0, 4, (32,)), torch.randint(0, 4, (32,))

    logits, pairs = model.reference(x)
    for _, s in pairs:
        s.retain_grad()
    fisher, loss = losses(logits * log_scale.exp(), targets, labels)
    fisher.backward(retain_graph=True)
    factors = [factors_linear(a.detach(), s.grad) for a, s in pairs]
    layers = [model.l1, model.l2, model.l3]
    grads = torch.autograd.grad(loss, [*[p for m in layers for p in (m.weight, m.bias)], log_scale])
    model.zero_grad()
    log_scale.grad = None
    vs, quad = [], 0.0
    for i, (a_f, g_f) in enumerate(factors):
        m = layer_matrix(grads[2 * i], grads[2 * i + 1])
        v = damped_solve_exact(a_f, g_f, m, DAMPING)
        vs.append(v)
        quad += float((v * m).sum())
    v_plain = grads[-1]
    if fisher_diagonal:  # the damped Fisher (f + λ)·I of this block, solved densely
        v_plain = torch.linalg.solve(torch.eye(4) * (fisher_diagonal + DAMPING), grads[-1])
    quad += float(v_plain @ grads[-1])
    nu = min(1.0, (kl_clip / (LR**2 * quad)) ** 0.5)
    assert nu < 0.5, "the test needs an active clip"

    out = model(x) * log_scale.exp()
    fisher, loss = losses(out, targets, labels)
    with opt.record_statistics():
        fisher.backward(retain_graph=True)
    opt.zero_grad()
    loss.backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    deltas = [p.detach() - b for p, b in zip(params, before)]
    for i in range(3):
        got = layer_matrix(deltas[2 * i], deltas[2 * i + 1])
        torch.testing.assert_close(got, -LR * nu * vs[i], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(deltas[-1], -LR * nu * v_plain, rtol=1e-7, atol=1e-12)
    assert opt.diagnostics.step_scale == pytest.approx(nu, rel=1e-9)
    assert opt.diagnostics.quadratic == pytest.approx(quad, rel=1e-9)


def test_momentum_and_weight_decay_follow_sgd_semantics():
    torch.manual_seed(6)
    lin = nn.Linear(3, 2)
    opt = exact_opts(lin, momentum=0.5, weight_decay=0.1, inverse_update_interval=100)
    x = torch.randn(8, 3)
    target = torch.randn(8, 2)
    s = lin(x)
    with opt.record_statistics():
        (0.5 * (s - torch.randn_like(s)).pow(2).sum(1).mean()).backward()
    a_f = opt.state[lin.weight]["A"].clone()
    g_f = opt.state[lin.weight]["G"].clone()
    deltas, buf = [], None
    for _ in range(2):
        opt.zero_grad()
        theta = layer_matrix(lin.weight, lin.bias).detach().clone()
        (0.5 * (lin(x) - target).pow(2).sum(1).mean()).backward()
        m = layer_matrix(lin.weight.grad, lin.bias.grad) + 0.1 * theta
        v = damped_solve_exact(a_f, g_f, m, DAMPING)
        buf = v if buf is None else 0.5 * buf + v
        deltas.append(-LR * (1 - 0.5) * buf)  # ACKTR's EMA-form momentum: lr (1 - m) buf
        opt.step()
        got = layer_matrix(lin.weight, lin.bias).detach() - theta
        torch.testing.assert_close(got, deltas[-1], rtol=1e-7, atol=1e-10)
