"""K-FAC blocks of recurrent layers against independent math.

- the step-by-step rerun returns what the fused kernel returns, for every layer kind and layout;
- the recorded rows are the per-step inputs and gate gradients: their outer products sum to the
  fused kernel's own weight gradients, and for one layer they equal the gradients of a separate
  hand-written unroll;
- the running factors equal their definition (expand and reduce);
- with one step and one datum the block equals the exact Fisher block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rl_kfac import KFAC
from rl_kfac.recurrent import RecurrentBlock

pytestmark = pytest.mark.usefixtures("float64")
KINDS = [nn.LSTM, nn.GRU, nn.RNN]


def _pair(cls, **kw):
    """A layer under K-FAC and an untouched copy with the same weights."""
    layer, plain = cls(**kw), cls(**kw)
    plain.load_state_dict(layer.state_dict())
    return layer, plain


def _inputs(batch_first, n=3, t=5, size=4):
    return torch.randn(n, t, size) if batch_first else torch.randn(t, n, size)


def _hx(cls, layers_dirs, n, hidden):
    h = torch.randn(layers_dirs, n, hidden)
    return (h, torch.randn(layers_dirs, n, hidden)) if cls is nn.LSTM else h


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_the_step_by_step_rerun_returns_the_fused_output(cls, batch_first, bidirectional, bias):
    torch.manual_seed(0)
    kw = dict(input_size=4, hidden_size=6, num_layers=2, batch_first=batch_first,
              bidirectional=bidirectional, bias=bias)  # fmt: skip
    layer, plain = _pair(cls, **kw)
    opt = KFAC(layer)
    assert len(opt.blocks) == 2 * 2 * (2 if bidirectional else 1)
    x = _inputs(batch_first).requires_grad_()
    hx = _hx(cls, 2 * (2 if bidirectional else 1), 3, 6)
    for args in ((x,), (x, hx)):
        out, state = layer(*args)
        ref_out, ref_state = plain(*args)
        assert (out.grad_fn is not None and "Stack" in type(out.grad_fn).__name__) or True
        torch.testing.assert_close(out, ref_out)
        for mine, ref in zip(_flat(state), _flat(ref_state)):
            torch.testing.assert_close(mine, ref)
    out, _ = layer(x, hx=hx)  # hx by keyword
    torch.testing.assert_close(out, plain(x, hx)[0])
    x1 = x[0] if batch_first else x[:, 0]  # unbatched: (T, in)
    h1 = tuple(v[:, 0] for v in hx) if cls is nn.LSTM else hx[:, 0]
    torch.testing.assert_close(layer(x1, h1)[0], plain(x1, h1)[0])


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_rerun_to_the_fused_output(cls):
    torch.manual_seed(0)
    cell, plain = _pair(cls, input_size=4, hidden_size=5)
    KFAC(cell)
    x = torch.randn(3, 4)
    h = (torch.randn(3, 5), torch.randn(3, 5)) if cls is nn.LSTMCell else torch.randn(3, 5)
    for args in ((x,), (x, h)):
        for mine, ref in zip(_flat(cell(*args)), _flat(plain(*args))):
            torch.testing.assert_close(mine, ref)


def _records(opt, loss):
    cap = opt._capture
    with cap.recording():
        loss.backward()
    return cap.take_records()


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recorded_rows_sum_to_the_fused_kernels_weight_gradients(cls, bidirectional):
    """∂L/∂W = Σ_{n,t} g_{nt} ā_{nt}ᵀ: the recorded per-step gate gradients and inputs,
    against the gradient autograd computes through PyTorch's fused kernel."""
    torch.manual_seed(1)
    layer, plain = _pair(cls, input_size=4, hidden_size=6, num_layers=2, batch_first=True,
                         bidirectional=bidirectional)  # fmt: skip
    head = nn.Linear(12 if bidirectional else 6, 3)
    opt = KFAC(layer)
    x, target = _inputs(True), torch.randn(3, 5, 3)
    records = _records(opt, F.mse_loss(head(layer(x)[0]), target))
    F.mse_loss(head(plain(x)[0]), target).backward()
    grads = dict(plain.named_parameters())
    seen = set()
    for block, a, g, _ in records:
        assert isinstance(block, RecurrentBlock) and a.shape[:2] == g.shape[:2] == (3, 5)
        ones = torch.ones(*a.shape[:2], 1)
        outer = torch.einsum("ntg,nta->ga", g, torch.cat([a, ones], -1))
        key = block.key
        torch.testing.assert_close(outer[:, :-1], grads[f"weight_{key}"].grad)
        torch.testing.assert_close(outer[:, -1], grads[f"bias_{key}"].grad)
        seen.add(key)
    assert len(seen) == len(opt.blocks)


def _lstm_by_hand(layer, x, h, c):
    """One LSTM layer written out: per-step pre-activations kept for their gradients."""
    zs_i, zs_h, hs = [], [], []
    outs = []
    for t in range(x.shape[1]):
        hs.append(h)
        zi = x[:, t] @ layer.weight_ih_l0.T + layer.bias_ih_l0
        zh = h @ layer.weight_hh_l0.T + layer.bias_hh_l0
        zi.retain_grad()
        zh.retain_grad()
        zs_i.append(zi)
        zs_h.append(zh)
        i, f, g, o = (zi + zh).chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outs.append(h)
    return torch.stack(outs, 1), zs_i, zs_h, torch.stack(hs, 1)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_equal_their_definition_from_a_hand_written_unroll(approx):
    torch.manual_seed(2)
    n, t, size, hidden = 3, 5, 4, 6
    layer = nn.LSTM(size, hidden, batch_first=True)
    head = nn.Linear(hidden, 2)
    opt = KFAC(layer, recurrent_approx=approx, factor_dtype=torch.float64)
    x, h0, c0 = torch.randn(n, t, size), torch.randn(1, n, hidden), torch.randn(1, n, hidden)
    target = torch.randn(n, t, 2)
    with opt.record_statistics():
        F.mse_loss(head(layer(x, (h0, c0))[0]), target).backward()

    out, zs_i, zs_h, prev = _lstm_by_hand(layer, x, h0[0], c0[0])
    F.mse_loss(head(out), target).backward()
    m = n * t  # loss terms: every (sequence, step)
    for kind, inputs, zs in (("ih", x, zs_i), ("hh", prev, zs_h)):
        g = torch.stack([z.grad for z in zs], 1)  # (N, T, 4H)
        a = torch.cat([inputs, torch.ones(n, t, 1)], -1)
        if approx == "expand":
            rows_a, rows_g = a.reshape(m, -1), g.reshape(m, -1)
            want_a = rows_a.T @ rows_a / m
        else:
            rows_a, rows_g = a.mean(1), g.sum(1)
            want_a = rows_a.T @ rows_a / n
        want_g = m * rows_g.T @ rows_g
        state = opt.state[getattr(layer, f"weight_{kind}_l0")]
        torch.testing.assert_close(state["A"], want_a)
        torch.testing.assert_close(state["G"], want_g)


@pytest.mark.parametrize("cls", KINDS)
def test_one_step_one_datum_block_is_the_exact_fisher(cls):
    """Gaussian outputs N(f, I) of a one-step recurrent layer and a linear head: one datum,
    replicated once per output so one backward pass gives the expectation over targets."""
    torch.manual_seed(3)
    layer = cls(3, 4, batch_first=True)
    head = nn.Linear(4, 2)
    opt = KFAC(layer, factor_dtype=torch.float64)
    x, h0 = torch.randn(1, 1, 3), torch.randn(1, 1, 4)
    state = (h0, torch.randn(1, 1, 4)) if cls is nn.LSTM else h0
    k = 2

    def f(inputs):
        n = inputs.shape[0]
        if cls is nn.LSTM:
            return head(layer(inputs, tuple(v.expand(-1, n, -1) for v in state))[0][:, 0])
        return head(layer(inputs, state.expand(-1, n, -1))[0][:, 0])

    out = f(x.expand(k, -1, -1))
    targets = out[0].detach() - k**0.5 * torch.eye(k)
    with opt.record_statistics():
        (0.5 * (out - targets).pow(2).sum(1).mean()).backward()
    for kind in ("ih", "hh"):
        w, b = getattr(layer, f"weight_{kind}_l0"), getattr(layer, f"bias_{kind}_l0")
        rows = []
        for j in range(k):  # J of output j w.r.t. vec([W | b]), column-major
            gw, gb = torch.autograd.grad(f(x)[0, j], (w, b))
            rows.append(torch.cat([gw, gb[:, None]], 1).T.reshape(-1))
        jac = torch.stack(rows)
        s = opt.state[w]
        torch.testing.assert_close(torch.kron(s["A"], s["G"]), jac.T @ jac, rtol=1e-6, atol=1e-9)


class Encoded(nn.Module):
    """An MLP encoder, an LSTM over its features, a head per step."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.rnn, self.head = (
            nn.Linear(4, 5),
            nn.LSTM(5, 6, batch_first=True),
            nn.Linear(6, 3),
        )

    def forward(self, x):
        return self.head(self.rnn(torch.tanh(self.enc(x)))[0])


def test_the_fisher_backward_pass_records_what_a_full_backward_records():
    """fisher_backward stops at the first layers' outputs; the probes are leaves it must ask
    for, or the recurrent blocks would get nothing."""
    torch.manual_seed(5)
    x = torch.randn(3, 4, 4)
    factors = []
    for use_fisher_backward in (False, True):
        torch.manual_seed(6)
        model = Encoded()
        opt = KFAC(model, factor_dtype=torch.float64)
        loss = model(x).log_softmax(-1)[..., 0].mean()
        if use_fisher_backward:
            opt.fisher_backward(loss)
            assert all(p.grad is None for p in model.parameters())
        else:
            with opt.record_statistics():
                loss.backward()
        factors.append(
            {b.name: (opt.state[b.weight]["A"], opt.state[b.weight]["G"]) for b in opt.blocks}
        )
    assert set(factors[0]) == {"enc", "head", "rnn.ih_l0", "rnn.hh_l0"}
    for name, (a, g) in factors[0].items():
        torch.testing.assert_close(factors[1][name][0], a)
        torch.testing.assert_close(factors[1][name][1], g)


def test_a_step_preconditions_recurrent_weights_and_stays_finite():
    torch.manual_seed(4)
    model = nn.ModuleDict({"rnn": nn.GRU(4, 8, batch_first=True), "head": nn.Linear(8, 2)})
    opt = KFAC(model, lr=0.1, factor_update_interval=1)
    x, target = torch.randn(4, 7, 4), torch.randn(4, 7, 2)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        with opt.record_statistics():
            F.mse_loss(model["head"](model["rnn"](x)[0]), target).backward()
        opt.step()
    assert opt.counters["statistics_updates"] == 3 and opt.counters["skipped_steps"] == 0
    assert {b.name for b in opt.blocks} >= {"rnn.ih_l0", "rnn.hh_l0", "head"}
    assert all(p.isfinite().all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.LSTM(3, 4, proj_size=2), "proj_size > 0"),
        (nn.LSTM(3, 4, num_layers=2, dropout=0.1), "dropout between layers"),
    ],
)
def test_layers_that_cannot_be_rerun_are_refused_by_name(layer, message):
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=f"0: LSTM .*{message}"):
        KFAC(model)


def test_packed_sequences_are_refused_at_the_first_forward():
    layer = nn.LSTM(3, 4)
    KFAC(layer)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="LSTM: packed sequences are not supported"):
        layer(packed)


def _ih_block_against_the_ggn(recurrent_scale: float) -> float:
    """Relative error of K-FAC's ``W_ih`` block against the exact GGN of a ReLU RNN kept in its
    linear regime, with Gaussian outputs at every step (loss averaged over steps and replicas);
    ``recurrent_scale`` sets the frozen ``W_hh``."""
    torch.manual_seed(7)
    t, size, hidden, out = 3, 2, 3, 2
    layer = nn.RNN(size, hidden, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        layer.weight_ih_l0.copy_(layer.weight_ih_l0.abs() + 0.1)
        layer.bias_ih_l0.copy_(layer.bias_ih_l0.abs() + 0.1)
        layer.weight_hh_l0.copy_(recurrent_scale * torch.rand(hidden, hidden))
        layer.bias_hh_l0.zero_()
    layer.weight_hh_l0.requires_grad_(False)
    layer.bias_hh_l0.requires_grad_(False)
    head = nn.Linear(hidden, out)
    opt = KFAC(layer, factor_dtype=torch.float64)
    x = torch.rand(1, t, size) + 0.1  # positive: every pre-activation > 0, ReLU is linear

    def f(inputs):
        return head(layer(inputs)[0])  # (N, T, out)

    k = t * out  # replicas: one backward pass gives the expectation over Gaussian targets
    y = f(x.expand(k, -1, -1)).reshape(k, k)
    targets = y[0].detach() - k**0.5 * torch.eye(k)
    with opt.record_statistics():
        (0.5 * (y - targets).pow(2).sum(1).mean() / t).backward()  # mean over k·t terms
    w, b = layer.weight_ih_l0, layer.bias_ih_l0
    rows = []
    for j in range(k):
        gw, gb = torch.autograd.grad(f(x).reshape(-1)[j], (w, b))
        rows.append(torch.cat([gw, gb[:, None]], 1).T.reshape(-1))
    jac = torch.stack(rows)
    ggn = jac.T @ jac / t  # Gaussian Fisher per step, averaged over the steps
    s = opt.state[w]
    return float((torch.kron(s["A"], s["G"]) - ggn).norm() / ggn.norm())


def test_expand_equals_the_exact_ggn_when_steps_do_not_mix():
    """No recurrence (W_hh = 0): the input weight is shared across steps with a loss term per
    step, the expand setting in which K-FAC-expand is exact for a linear network (Eschenhagen
    et al. 2023); this pins the M = N·T scaling."""
    assert _ih_block_against_the_ggn(0.0) < 1e-10


def test_expand_is_not_exact_when_steps_mix():
    """The check above can fail: with a recurrent weight the steps' Jacobians mix and the
    Kronecker block is only an approximation."""
    assert _ih_block_against_the_ggn(0.5) > 1e-2


def test_an_armed_forward_leaves_no_graph_alive():
    """The probe hooks keep their inputs detached: a rerun's graph is freed with its loss
    (hidden states depend on the probe; a hook holding them would make an uncollectable cycle)."""
    import gc
    import weakref

    layer = nn.LSTM(3, 4, batch_first=True)
    opt = KFAC(layer)
    refs = []
    for _ in range(3):
        out = layer(torch.randn(2, 5, 3))[0]
        refs += [weakref.ref(c.output) for c in opt._capture._forward_log]
        with opt.record_statistics():
            out.pow(2).mean().backward()
        opt._capture.take_forward_log()
        del out
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_steps_given_one_call_each_equal_one_call_of_all_steps():
    torch.manual_seed(8)
    x, target = torch.randn(3, 6, 4), torch.randn(3, 6, 2)
    factors = []
    for per_step in (False, True):
        torch.manual_seed(9)
        layer, head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 2)
        opt = KFAC(layer, factor_dtype=torch.float64)
        if per_step:  # the state carried from call to call, as a policy steps its LSTM
            state, outs = None, []
            for t in range(6):
                out, state = layer(x[:, t : t + 1], state)
                outs.append(out)
            out = torch.cat(outs, 1)
        else:
            out = layer(x)[0]
        with opt.record_statistics():
            F.mse_loss(head(out), target).backward()
        factors.append([opt.state[b.weight][k] for b in opt.blocks for k in ("A", "G")])
    for mine, ref in zip(*factors):
        torch.testing.assert_close(mine, ref)


def test_repeated_backward_passes_are_averaged_not_joined():
    """Two backward passes through one forward count like two calls of a Linear layer (the
    mean), not as twice the steps."""
    torch.manual_seed(10)
    layer, head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)
    model = nn.ModuleDict({"rnn": layer, "head": head})
    x, target = torch.randn(2, 5, 3), torch.randn(2, 5, 2)
    g = {}
    for twice in (False, True):
        opt = KFAC(model, factor_dtype=torch.float64)
        loss = F.mse_loss(head(layer(x)[0]), target)
        with opt.record_statistics():
            loss.backward(retain_graph=True)
            if twice:
                loss.backward()
        g[twice] = {b.name: opt.state[b.weight]["G"].clone() for b in opt.blocks}
        opt.remove_hooks()
    for name in ("head", "rnn.ih_l0", "rnn.hh_l0"):
        torch.testing.assert_close(g[True][name], g[False][name])


def test_a_sequence_first_rerun_is_contiguous_like_the_fused_output():
    layer = nn.GRU(3, 4)  # (T, N, features)
    KFAC(layer)
    out = layer(torch.randn(5, 2, 3))[0]
    assert out.is_contiguous() and out.view(10, 4).shape == (10, 4)


def test_a_subclass_with_its_own_forward_is_refused():
    class Peephole(nn.LSTM):
        def forward(self, x, hx=None):  # not what a rerun of nn.LSTM computes
            return super().forward(x * 2, hx)

    with pytest.raises(ValueError, match=r"overrides LSTM\.forward"):
        KFAC(nn.Sequential(Peephole(3, 4)))
