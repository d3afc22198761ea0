"""Curvature blocks: one per supported layer, the layer's view of the K-FAC math.

A block sees its layer's weight and bias as one matrix ``[W | b]`` of shape ``(dim_g, dim_a)``:
rows are output units (the G side), columns are input features plus a homogeneous ``1`` for the
bias (the A side). The Fisher block is approximated by ``A ⊗ G`` with

    A = (1/rows) Σ ā āᵀ,     ā = [a; 1],
    G = N Σ g gᵀ  = (1/N) Σ (N g)(N g)ᵀ,

where ``g = ∂L/∂s`` at the pre-activation ``s`` of the *batch-mean* Fisher loss ``L`` over ``N``
samples. Extra dimensions shared by one weight (positions of a convolution, leading dims of a
Linear applied to sequences) are handled as in Eschenhagen et al. (2023), "Kronecker-Factored
Approximate Curvature for Modern Neural Network Architectures":

- expand: every shared position is one more row of ``a`` and ``g`` (``rows = N·R``);
- reduce: ``a`` is averaged and ``g`` summed over the shared positions (``rows = N``).

A block only turns tensors into rows; the optimizer owns the running averages. With
``statistics_rows`` set, :mod:`rl_kfac.statistics` asks a block for a uniform random subset of its
rows only (:meth:`Block.rows_at`), so the unused rows (im2col patches) are never materialised.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

ConvApprox = Literal["expand", "reduce"]
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


class Block:
    """Common part of a layer block: parameter bookkeeping and the ``[W | b]`` matrix layout."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        has_bias: bool,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        """``weight``/``bias``: the layer's own ``weight``/``bias`` unless given (a layer with
        several weights, such as an LSTM, has a block per weight)."""
        own_weight = module.weight if weight is None else weight
        assert isinstance(own_weight, Tensor)
        self.module = module
        self.name = name
        self.weight: Tensor = own_weight
        own_bias = (module.bias if bias is None else bias) if has_bias else None
        self.bias: Tensor | None = own_bias if isinstance(own_bias, Tensor) else None
        self.dim_g = int(own_weight.shape[0])
        self.dim_in = int(own_weight[0].numel())
        self.dim_a = self.dim_in + int(has_bias)

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def matrix_views(self, mat: Tensor) -> list[Tensor]:
        """Views of a ``(dim_g, ≥dim_a)`` matrix shaped like ``params`` (weight, then bias)."""
        views = [mat[: self.dim_g, : self.dim_in].view(self.weight.shape)]
        if self.bias is not None:
            views.append(mat[: self.dim_g, self.dim_in])
        return views

    def input_rows(self, a: Tensor) -> tuple[Tensor, float]:
        """Rows ``X`` of augmented inputs and a scale ``s`` such that ``A = s XᵀX``."""
        raise NotImplementedError

    def grad_rows(self, g: Tensor) -> tuple[Tensor, float]:
        """Rows ``Y`` of output gradients and a scale ``s`` such that ``G = s YᵀY``."""
        raise NotImplementedError

    def row_count(self, g: Tensor) -> int:
        """Number of rows of ``X`` and ``Y`` for output gradients ``g``."""
        raise NotImplementedError

    def grad_scale(self, g: Tensor) -> float:
        """The scale ``s`` of :meth:`grad_rows` (the Fisher loss's batch size ``N``)."""
        return float(g.shape[0] if g.dim() > 1 else 1)

    def rows_at(self, a: Tensor, g: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``index`` of ``X`` and of ``Y`` (the same rows: position ``i`` of both)."""
        raise NotImplementedError

    def _with_bias(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, 1), value=1.0) if self.bias is not None else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, A={self.dim_a}, G={self.dim_g})"


class LinearBlock(Block):
    """``nn.Linear`` with any leading dims: the first is the batch, the others expand into rows."""

    def input_rows(self, a: Tensor) -> tuple[Tensor, float]:
        x = self._with_bias(a.reshape(-1, self.dim_in))
        return x, 1.0 / x.shape[0]

    def grad_rows(self, g: Tensor) -> tuple[Tensor, float]:
        return g.reshape(-1, self.dim_g), self.grad_scale(g)

    def row_count(self, g: Tensor) -> int:
        return g.numel() // self.dim_g

    def rows_at(self, a: Tensor, g: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        x = self._with_bias(a.reshape(-1, self.dim_in)[index])
        return x, g.reshape(-1, self.dim_g)[index]


class Conv2dBlock(Block):
    """``nn.Conv2d`` (stride, padding incl. "same" and non-zero modes, dilation; groups=1)."""

    def __init__(self, module: nn.Conv2d, name: str, has_bias: bool, approx: ConvApprox) -> None:
        super().__init__(module, name, has_bias)
        self.conv = module
        self.approx: ConvApprox = approx

    def _padded(self, a: Tensor) -> Tensor:
        conv = self.conv
        if a.dim() == 3:
            a = a.unsqueeze(0)
        pad = _conv_padding(conv)
        if any(pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            a = F.pad(a, pad, mode=mode)
        return a

    def input_rows(self, a: Tensor) -> tuple[Tensor, float]:
        a = self._padded(a)
        (kh, kw), (dh, dw), (sh, sw) = self.conv.kernel_size, self.conv.dilation, self.conv.stride
        n = a.shape[0]
        # Strided windows are views: no im2col copy before the reduction (or the expand reshape).
        cols = a.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (N, C, H, Wo, kw)
        if self.approx == "reduce":
            # Separable: sum over output columns first, then over output rows.
            summed = cols.sum(dim=3).unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]  # (N,C,Ho,kw,kh)
            r = summed.shape[2] * cols.shape[3]
            mean = summed.sum(dim=2).transpose(2, 3).reshape(n, self.dim_in) / r
            return self._with_bias(mean), 1.0 / n
        patches = cols.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]  # (N, C, Ho, Wo, kw, kh)
        r = patches.shape[2] * patches.shape[3]
        x = patches.permute(0, 2, 3, 1, 5, 4).reshape(n * r, self.dim_in)
        return self._with_bias(x), 1.0 / (n * r)

    def _windows(self, a: Tensor) -> Tensor:
        """The patch of every output position, as a view: ``(N, Ho, Wo, C, kh, kw)``."""
        a = self._padded(a)
        (kh, kw), (dh, dw), (sh, sw) = self.conv.kernel_size, self.conv.dilation, self.conv.stride
        cols = a.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]
        patches = cols.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]
        return patches.permute(0, 2, 3, 1, 5, 4)

    def grad_rows(self, g: Tensor) -> tuple[Tensor, float]:
        g = _batched(g)
        if self.approx == "expand":
            return g.permute(0, 2, 3, 1).reshape(-1, self.dim_g), self.grad_scale(g)
        return g.sum(dim=(2, 3)), self.grad_scale(g)

    def row_count(self, g: Tensor) -> int:
        g = _batched(g)
        return g.shape[0] * (g.shape[2] * g.shape[3] if self.approx == "expand" else 1)

    def grad_scale(self, g: Tensor) -> float:
        return float(_batched(g).shape[0])

    def rows_at(self, a: Tensor, g: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        g = _batched(g)
        if self.approx == "reduce":  # rows are samples
            return self.input_rows(_batched(a)[index])[0], g[index].sum(dim=(2, 3))
        ho, wo = g.shape[2], g.shape[3]
        n, pos = index // (ho * wo), index % (ho * wo)
        r, c = pos // wo, pos % wo
        x = self._windows(a)[n, r, c].reshape(len(index), self.dim_in)
        return self._with_bias(x), g.permute(0, 2, 3, 1)[n, r, c]


def _batched(t: Tensor) -> Tensor:
    """A conv input or output gradient with its batch dim (an unbatched call has none)."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` widths (left, right, top, bottom) of the layer's own padding.

    ``"same"`` pads a total of ``dilation·(kernel − 1)`` per dimension, the smaller half first,
    as ``nn.Conv2d`` does; ``"valid"`` pads nothing.
    """
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = padding
    return (pw, pw, ph, ph)


def make_block(module: nn.Module, name: str, has_bias: bool, conv_approx: ConvApprox) -> Block:
    """The block for a supported layer; ``ValueError`` for layers K-FAC cannot factor here."""
    if isinstance(module, nn.Linear):
        return LinearBlock(module, name, has_bias)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"{name}: Conv2d with groups={module.groups} has no Kronecker-factored block here"
            )
        return Conv2dBlock(module, name, has_bias, conv_approx)
    raise ValueError(f"{name}: unsupported layer type {type(module).__name__}")


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS)
