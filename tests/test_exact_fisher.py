"""Single-datum (and deep-linear) exactness: A ⊗ G equals the exact Fisher block.

The Fisher loss is built so that one backward pass yields the *expectation* over targets instead
of one sample: the datum is replicated once per target value, each replica weighted so that
G = (1/K) Σ_k (K g_k)(K g_k)ᵀ equals E_y[∇ log p ∇ log pᵀ]. The exact Fisher block is computed
independently with torch.func Jacobians.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from rl_kfac import KFAC

pytestmark = pytest.mark.usefixtures("float64")


def kfac_dense(opt: KFAC, layer: nn.Module) -> torch.Tensor:
    state = opt.state[layer.weight]
    return torch.kron(state["A"], state["G"])


def jacobian_wrt_layer(model: nn.Module, layer_name: str, fn, x):
    """J of fn(model(x)) w.r.t. vec([W | b]) (column-major), rows = outputs of fn."""
    params = dict(model.named_parameters())
    w_key, b_key = f"{layer_name}.weight", f"{layer_name}.bias"

    def f(w, b):
        return fn(functional_call(model, {**params, w_key: w, b_key: b}, (x,))).reshape(-1)

    jw, jb = jacrev(f, argnums=(0, 1))(params[w_key], params[b_key])
    out = jw.shape[0]
    mat = torch.cat([jw.reshape(out, jw.shape[1], -1), jb.unsqueeze(2)], dim=2)  # (K, dg, da)
    return mat.transpose(1, 2).reshape(out, -1)  # column-major vec of [W | b]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_categorical_single_datum_is_exact():
    torch.manual_seed(0)
    model = MLP()
    opt = KFAC(model, factor_dtype=torch.float64)
    x = torch.randn(1, 4)
    classes = 3
    logits = model(x.expand(classes, 4))
    probs = logits.softmax(-1)[0].detach()
    weights = (classes * probs).sqrt()
    nll = F.cross_entropy(logits, torch.arange(classes), reduction="none")
    with opt.record_statistics():
        (weights * nll).mean().backward()

    for name, layer in [("l1", model.l1), ("l2", model.l2)]:
        jac = jacobian_wrt_layer(model, name, lambda out: out.log_softmax(-1), x)  # (C, P)
        exact = jac.T @ torch.diag(probs) @ jac
        torch.testing.assert_close(kfac_dense(opt, layer), exact, rtol=1e-6, atol=1e-9)


def gaussian_expectation_loss(f: torch.Tensor) -> torch.Tensor:
    """Replicas k of one datum with targets f - sqrt(K) e_k: one backward gives E_y over N(f, I)."""
    k = f[0].numel()
    targets = f[0].detach().reshape(1, -1) - k**0.5 * torch.eye(k)
    return 0.5 * (f.reshape(k, -1) - targets).pow(2).sum(1).mean()


class ExpandNet(nn.Module):
    """Deep linear conv net whose loss is per position: K-FAC-expand is exact (Eschenhagen 2023)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.c2(self.c1(x))


class ReduceNet(nn.Module):
    """Linear conv, average pooling, linear head: K-FAC-reduce is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.c1(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("net", "approx", "layers"),
    [(ExpandNet, "expand", ["c1", "c2"]), (ReduceNet, "reduce", ["c1", "fc"])],
)
def test_gaussian_single_datum_conv_is_exact(net, approx, layers):
    torch.manual_seed(1)
    model = net()
    opt = KFAC(model, conv_approx=approx, factor_dtype=torch.float64)
    x = torch.randn(1, 2, 5, 5)
    k = model(x)[0].numel()
    with opt.record_statistics():
        gaussian_expectation_loss(model(x.expand(k, -1, -1, -1))).backward()
    for name in layers:
        jac = jacobian_wrt_layer(model, name, lambda out: out, x)  # Fisher of N(f, I) = JᵀJ
        torch.testing.assert_close(
            kfac_dense(opt, getattr(model, name)), jac.T @ jac, rtol=1e-6, atol=1e-9
        )


def test_expand_is_not_exact_in_the_reduce_setting():
    """The check above can fail: the wrong approximation for the setting is measurably off."""
    torch.manual_seed(1)
    model = ReduceNet()
    opt = KFAC(model, conv_approx="expand", factor_dtype=torch.float64)
    x = torch.randn(1, 2, 5, 5)
    with opt.record_statistics():
        gaussian_expectation_loss(model(x.expand(2, -1, -1, -1))).backward()
    jac = jacobian_wrt_layer(model, "c1", lambda out: out, x)
    err = (kfac_dense(opt, model.c1) - jac.T @ jac).norm() / (jac.T @ jac).norm()
    assert err > 1e-2
