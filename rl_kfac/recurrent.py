"""Recurrent layers as K-FAC blocks: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells.

Each layer and direction has two weights shared across the T steps of a sequence, and each is a
block with its own bias: ``W_ih`` (inputs ``x_t``) and ``W_hh`` (inputs ``h_{t-1}``), both with
output rows the gate pre-activations (4H for an LSTM, 3H for a GRU, H for an RNN). Treating them
as two blocks, like two Linear layers, handles the GRU, whose candidate gate multiplies the
recurrent pre-activation by the reset gate, the same way as the LSTM, where both pre-activations
simply add (Martens, Ba & Johnson 2018 stack ``[x_t; h_{t-1}]`` into one block for that case).

The weight is shared across time as a convolution's is across positions (Eschenhagen et al.
2023), with the Fisher loss averaged over every (sequence, step) pair, as RL losses are, so
``M = N·T`` loss terms for N sequences of T steps, ``g`` the gradient of that mean loss at a
step's gate pre-activations, and ``ā = [a; 1]``:

- expand: every step is a row, ``A = (1/M) Σ_{n,t} ā āᵀ``, ``G = M Σ_{n,t} g gᵀ``;
- reduce: one row per sequence, ``A = (1/N) Σ_n ā_n ā_nᵀ`` with ``ā_n`` the mean of ``ā`` over
  the steps, ``G = M Σ_n (Σ_t g)(Σ_t g)ᵀ``.

With one step both are the Linear layer's block. A cell (``nn.LSTMCell``, …), or a layer given
one step at a time, is one step per call: calls on the same N sequences within one statistics
update are joined along time (:mod:`rl_kfac.statistics`), as if the steps came in one call.

PyTorch's fused kernels do not expose the per-step gate gradients. While statistics are due, a
forward hook runs the layer again step by step with the same weights and returns that output in
place of the fused one (the same function, in other rounding), with a zero "probe" tensor added
to each pre-activation: the gradient that reaches a probe is the per-step gate gradient. The
user's model is not changed, and passes without statistics use the fused kernel. Limits: one
K-FAC optimizer per recurrent layer (a second one's rerun would replace the first's output, and
its probes with it); a subclass that overrides ``forward`` is refused; under ``torch.autocast``
the rerun computes in the input's dtype, not the fused kernel's lower precision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rl_kfac.blocks import Block, LinearBlock

RecurrentApprox = Literal["expand", "reduce"]
RECURRENT_LAYERS = (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)
Probe = Callable[[Block, Tensor, Tensor], None]  # (block, inputs, probe tensor)


class RecurrentBlock(LinearBlock):
    """One shared weight of a recurrent layer; records hold ``(N, T, ·)`` inputs and gradients.
    ``expand`` makes rows as a Linear layer does of its leading dims, with ``M = N·T`` as the
    gradient scale."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        weight: Tensor,
        bias: Tensor | None,
        approx: RecurrentApprox,
    ) -> None:
        super().__init__(module, name, bias is not None, weight, bias)
        self.approx: RecurrentApprox = approx
        self.key = name.rsplit(".", 1)[-1]  # "ih_l0", "hh_l1_reverse", "ih" (a cell)

    def input_rows(self, a: Tensor) -> tuple[Tensor, float]:
        if self.approx == "reduce":
            return self._with_bias(a.mean(dim=1)), 1.0 / a.shape[0]
        return super().input_rows(a)

    def grad_rows(self, g: Tensor) -> tuple[Tensor, float]:
        if self.approx == "reduce":
            return g.sum(dim=1), self.grad_scale(g)
        return super().grad_rows(g)

    def grad_scale(self, g: Tensor) -> float:
        return float(g.shape[0] * g.shape[1])  # M = N·T loss terms

    def row_count(self, g: Tensor) -> int:
        return g.shape[0] if self.approx == "reduce" else super().row_count(g)

    def rows_at(self, a: Tensor, g: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        if self.approx == "reduce":
            return self._with_bias(a[index].mean(dim=1)), g[index].sum(dim=1)
        return super().rows_at(a, g, index)


def check_recurrent(module: nn.Module, name: str) -> None:
    """``ValueError`` naming the layer for what the step-by-step rerun cannot reproduce."""
    kind = type(module).__name__
    base = next(c for c in RECURRENT_LAYERS if isinstance(module, c))
    if type(module).forward is not base.forward:
        raise ValueError(
            f"{name}: {kind} overrides {base.__name__}.forward; the step-by-step rerun would "
            "replace what its forward computes"
        )
    if getattr(module, "proj_size", 0):
        raise ValueError(f"{name}: {kind} with proj_size > 0 has no K-FAC block here")
    if getattr(module, "dropout", 0.0) and getattr(module, "num_layers", 1) > 1:
        raise ValueError(
            f"{name}: {kind} with dropout between layers has no K-FAC block here (its dropout "
            "masks cannot be reproduced step by step); use dropout=0"
        )


def recurrent_blocks(
    module: nn.Module, name: str, approx: RecurrentApprox, trainable: Callable[[Tensor], bool]
) -> list[RecurrentBlock]:
    """The blocks of ``module`` (ih then hh, per layer and direction) whose weight is trainable;
    a bias that is not (frozen, or not the optimizer's) is a constant of the layer."""
    blocks = []
    for suffix in _suffixes(module):
        for kind in ("ih", "hh"):
            weight = getattr(module, f"weight_{kind}{suffix}")
            bias = getattr(module, f"bias_{kind}{suffix}", None)
            if not trainable(weight):
                continue
            bias = bias if isinstance(bias, Tensor) and trainable(bias) else None
            blocks.append(RecurrentBlock(module, f"{name}.{kind}{suffix}", weight, bias, approx))
    return blocks


def _suffixes(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNCellBase):
        return [""]
    assert isinstance(module, nn.RNNBase)
    directions = ["", "_reverse"] if module.bidirectional else [""]
    return [f"_l{layer}{d}" for layer in range(module.num_layers) for d in directions]


def unrolled_forward(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], probe: Probe,
    blocks: Mapping[str, Block],
) -> Any:  # fmt: skip
    """``module(*args, **kwargs)`` computed step by step, calling ``probe(block, inputs, p)``
    for each block's zero probe ``p`` (``(N, T, gates·H)``, added to its pre-activations) and
    its inputs (``(N, T, in)``)."""
    bound = _bind(module, args, kwargs)
    if isinstance(module, nn.RNNCellBase):
        return _cell_forward(module, *bound, probe, blocks)
    assert isinstance(module, nn.RNNBase)
    return _sequence_forward(module, *bound, probe, blocks)


def _bind(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    values = list(args) + [None] * (2 - len(args))
    x = kwargs.get("input", values[0])
    hx = kwargs.get("hx", values[1])
    if isinstance(x, nn.utils.rnn.PackedSequence):
        raise ValueError(
            f"{type(module).__name__}: packed sequences are not supported by K-FAC's recurrent "
            "blocks; pad the sequences (and mask the loss) instead"
        )
    return x, hx


def _step(
    module: nn.Module, zi: Tensor, zh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step from the input and recurrent pre-activations (PyTorch's gate order)."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        i, f, g, o = (zi + zh).chunk(4, dim=-1)
        assert c is not None
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        ri, ui, ni = zi.chunk(3, dim=-1)
        rh, uh, nh = zh.chunk(3, dim=-1)
        r, u = torch.sigmoid(ri + rh), torch.sigmoid(ui + uh)
        n = torch.tanh(ni + r * nh)
        return n + u * (h - n), None
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return act(zi + zh), None


def _run(
    module: nn.Module,
    suffix: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    probe: Probe,
    blocks: Mapping[str, Block],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction over ``x`` ``(N, T, in)``: outputs ``(N, T, H)``, last h, c."""
    w_ih, w_hh = getattr(module, f"weight_ih{suffix}"), getattr(module, f"weight_hh{suffix}")
    b_ih = getattr(module, f"bias_ih{suffix}", None)
    b_hh = getattr(module, f"bias_hh{suffix}", None)
    n, t = x.shape[0], x.shape[1]
    zi = nn.functional.linear(x, w_ih, b_ih)
    block_ih, block_hh = blocks.get(f"ih{suffix}"), blocks.get(f"hh{suffix}")
    if block_ih is not None:
        p_ih = zi.new_zeros(zi.shape, requires_grad=True)
        probe(block_ih, x, p_ih)
        zi = zi + p_ih
    p_hh = zi.new_zeros((n, t, w_hh.shape[0]), requires_grad=True) if block_hh else None
    # unbind, not per-step indexing: its backward is one stack, not T zero-filled copies
    p_steps = p_hh.unbind(1) if p_hh is not None else None
    outputs, previous = [], []
    for step, zi_t in enumerate(zi.unbind(1)):
        previous.append(h)
        zh = nn.functional.linear(h, w_hh, b_hh)
        if p_steps is not None:
            zh = zh + p_steps[step]
        h, c = _step(module, zi_t, zh, h, c)
        outputs.append(h)
    if block_hh is not None and p_hh is not None:
        probe(block_hh, torch.stack(previous, dim=1), p_hh)
    return torch.stack(outputs, dim=1), h, c


def _one_sample(x: Tensor, hx: Any, x_dim: int, h_dim: int) -> tuple[Tensor, Any]:
    """An unbatched call's input and state (a tensor or an LSTM's pair) as a batch of one."""
    if isinstance(hx, tuple):
        hx = tuple(v.unsqueeze(h_dim) for v in hx)
    elif hx is not None:
        hx = hx.unsqueeze(h_dim)
    return x.unsqueeze(x_dim), hx


def _state(hx: Any, is_lstm: bool, zeros: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(h, c)`` from a call's state argument (``c`` None but for an LSTM); ``zeros`` if none."""
    if hx is None:
        return zeros, zeros if is_lstm else None
    return hx if is_lstm else (hx, None)


def _sequence_forward(
    module: nn.RNNBase, x: Tensor, hx: Any, probe: Probe, blocks: Mapping[str, Block]
) -> Any:
    is_lstm = isinstance(module, nn.LSTM)
    unbatched = x.dim() == 2
    if unbatched:
        x, hx = _one_sample(x, hx, 0 if module.batch_first else 1, 1)
    seq = x if module.batch_first else x.transpose(0, 1)  # (N, T, in)
    n, dirs, size = seq.shape[0], 2 if module.bidirectional else 1, module.hidden_size
    h0, c0 = _state(hx, is_lstm, seq.new_zeros(module.num_layers * dirs, n, size))
    last_h, last_c = [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            inputs = seq if d == 0 else seq.flip(1)
            c = None if c0 is None else c0[k]
            out, h, c = _run(module, suffix, inputs, h0[k], c, probe, blocks)
            outs.append(out if d == 0 else out.flip(1))
            last_h.append(h)
            last_c.append(c)
        seq = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
    out = seq if module.batch_first else seq.transpose(0, 1).contiguous()  # as the fused kernel
    h_n = torch.stack(last_h)
    c_n = torch.stack([c for c in last_c if c is not None]) if is_lstm else None
    if unbatched:
        out = out.squeeze(0 if module.batch_first else 1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    return (out, (h_n, c_n)) if is_lstm else (out, h_n)


def _cell_forward(
    module: nn.RNNCellBase, x: Tensor, hx: Any, probe: Probe, blocks: Mapping[str, Block]
) -> Any:
    is_lstm = isinstance(module, nn.LSTMCell)
    unbatched = x.dim() == 1
    if unbatched:
        x, hx = _one_sample(x, hx, 0, 0)
    h, c = _state(hx, is_lstm, x.new_zeros(x.shape[0], module.hidden_size))
    _, h, c = _run(module, "", x.unsqueeze(1), h, c, probe, blocks)
    if unbatched:
        h = h.squeeze(0)
        c = c.squeeze(0) if c is not None else None
    return (h, c) if is_lstm else h
