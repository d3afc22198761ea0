"""Cost of one K-FAC update against one RMSprop update, on ACKTR's two standard networks and
a recurrent (LSTM) policy.

K-FAC update : forward + Fisher backward (statistics) + loss backward + KFAC.step
RMSprop update: forward + loss backward + RMSprop.step
Inverse (eigen) updates every 10 steps are amortised: each sample is the mean of a block of 10
updates, and the median over blocks is reported.

    python scripts/bench_optimizer.py [--device auto] [--blocks 7] [--only cnn-320,mlp-2048]
        [--statistics-rows M] [--factor-update-interval T] [--background] [--kl-guard F]

Each row also prints the multiply-adds of the variant's factor statistics per update. Every
case times full exact statistics ("exact", KFAC's defaults) and the K-FAC settings of the shipped
config with the same batch shape ("shipped: <config>"); the flags add single options.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_kfac import KFAC
from rl_kfac.recurrent import RecurrentBlock


def mlp_policy(obs_dim: int = 8, n_actions: int = 4) -> nn.Module:
    """64-64 tanh actor and critic trunks (separate, as SB3's MlpPolicy)."""

    def trunk(out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out)
        )

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pi, self.vf = trunk(n_actions), trunk(1)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.pi(x), self.vf(x).squeeze(-1)

    return MLP()


def nature_cnn_policy(n_actions: int = 6) -> nn.Module:
    """Nature CNN, last conv 32 filters as in the ACKTR paper, shared trunk, two heads."""

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv2d(4, 32, 8, stride=4),
                nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2),
                nn.ReLU(),
                nn.Conv2d(64, 32, 3, stride=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, 512),
                nn.ReLU(),
            )
            self.pi, self.vf = nn.Linear(512, n_actions), nn.Linear(512, 1)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = self.trunk(x)
            return self.pi(h), self.vf(h).squeeze(-1)

    return CNN()


def lstm_policy(obs_dim: int = 4, n_actions: int = 2) -> nn.Module:
    """An LSTM core (64 units) under 64-unit tanh heads, over whole env sequences (batch-first
    ``(envs, steps, obs)``), as ``configs/*/cartpole_novel.yaml``."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(obs_dim, 64, batch_first=True)
            self.pi = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, n_actions))
            self.vf = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = self.rnn(x)[0].reshape(-1, 64)
            return self.pi(h), self.vf(h).squeeze(-1)

    return Recurrent()


def a2c_loss(logits: Tensor, values: Tensor, batch: dict[str, Tensor]) -> Tensor:
    logp = logits.log_softmax(-1)
    chosen = logp.gather(1, batch["actions"][:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return (
        -(chosen * batch["adv"]).mean()
        + 0.5 * F.mse_loss(values, batch["returns"])
        - 0.01 * entropy
    )


def fisher_loss(logits: Tensor, values: Tensor) -> Tensor:
    """Sampled-action NLL plus the Gauss-Newton value term (σ = 1, sampled target)."""
    with torch.no_grad():
        gumbel = -torch.empty_like(logits).exponential_().log()
        sampled = (logits + gumbel).argmax(-1)  # Gumbel-max: a categorical sample
        target = values + torch.randn_like(values)
    return F.cross_entropy(logits, sampled) + 0.5 * F.mse_loss(values, target)


def kfac_update(model: nn.Module, opt: KFAC, batch: dict[str, Tensor]) -> None:
    logits, values = model(batch["obs"])
    if opt.statistics_due:
        opt.fisher_backward(fisher_loss(logits, values))
    opt.zero_grad()
    a2c_loss(logits, values, batch).backward()
    kl = None
    if opt.kl_guard is not None:  # the guard's measurement: one more forward pass
        old = logits.detach().log_softmax(-1)
        kl = functools.partial(categorical_kl, old, model, batch["obs"])
    opt.step(kl=kl)


def categorical_kl(old: Tensor, model: nn.Module, obs: Tensor) -> Tensor:
    """KL(π_old ‖ π_now) of a categorical policy, averaged over the batch."""
    new = model(obs)[0].log_softmax(-1)
    return (old.exp() * (old - new)).sum(-1).mean()


def rmsprop_update(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor]) -> None:
    logits, values = model(batch["obs"])
    opt.zero_grad()
    a2c_loss(logits, values, batch).backward()
    opt.step()


def time_interleaved(
    updates: dict[str, Callable[[], None]], blocks: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Median over blocks of the mean ms of 10 consecutive updates, per update kind.

    The kinds take turns block by block, so drift in the machine's speed hits all of them alike.
    """
    samples: dict[str, list[float]] = {k: [] for k in updates}
    for i in range(blocks + 1):
        for key, update in updates.items():
            start = time.perf_counter()
            for _ in range(10):
                update()
            sync()
            if i > 0:  # the first block is warm-up
                samples[key].append((time.perf_counter() - start) / 10 * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def make_batch(kind: str, n: int, device: torch.device) -> dict[str, Tensor]:
    if kind == "lstm":  # 8 env sequences of n / 8 steps
        obs, n_actions = torch.randn(8, n // 8, 4), 2
    else:
        obs = torch.randn(n, 8) if kind == "mlp" else torch.rand(n, 4, 84, 84)
        n_actions = 4 if kind == "mlp" else 6
    return {
        "obs": obs.to(device),
        "actions": torch.randint(0, n_actions, (n,), device=device),
        "adv": torch.randn(n, device=device),
        "returns": torch.randn(n, device=device),
    }


def statistics_gmac(model: nn.Module, opt: KFAC, batch: dict[str, Tensor], interval: int) -> float:
    """Multiply-adds of the factor products ``XᵀX`` and ``YᵀY`` per update, in G.

    Rows per layer from one probe forward: the batch, times the output positions for conv
    ``expand``; at most ``statistics_rows`` of them. Divided by the statistics interval.
    """
    shapes: dict[nn.Module, torch.Size] = {}
    hooks = [
        b.module.register_forward_hook(lambda m, args, out: shapes.__setitem__(m, out.shape))
        for b in opt.blocks
        if not isinstance(b, RecurrentBlock)
    ]
    with torch.no_grad():
        model(batch["obs"])
    for h in hooks:
        h.remove()
    total = 0.0
    for block in opt.blocks:
        if isinstance(block, RecurrentBlock):  # a row per (sequence, step)
            total += (
                batch["obs"].shape[0] * batch["obs"].shape[1] * (block.dim_a**2 + block.dim_g**2)
            )
            continue
        shape = shapes[block.module]
        rows = shape[0]
        if isinstance(block.module, nn.Conv2d) and opt.conv_approx == "expand":
            rows *= shape[2] * shape[3]
        if opt.statistics_rows is not None:
            rows = min(rows, opt.statistics_rows)
        total += rows * (block.dim_a**2 + block.dim_g**2)
    return total / interval / 1e9


CASES: dict[str, tuple[str, Callable[[], nn.Module], int]] = {
    "mlp-320": ("MLP 64-64 tanh, batch 16x20", mlp_policy, 320),
    "mlp-2048": ("MLP 64-64 tanh, batch 8x256", mlp_policy, 2048),
    "cnn-320": ("Nature CNN, batch 16x20", nature_cnn_policy, 320),
    "cnn-640": ("Nature CNN, batch 32x20", nature_cnn_policy, 640),
    "lstm-256": ("LSTM 64, 8 sequences x 32", lstm_policy, 256),
}
# the shipped config whose K-FAC settings each case also times (same n_envs x n_steps, except
# cnn-640: no Atari config ships 32 envs)
SHIPPED = {
    "mlp-320": "configs/acktr/lunarlander.yaml",
    "mlp-2048": "configs/ppo_kfac/halfcheetah.yaml",
    "cnn-320": "configs/acktr/pong.yaml",
    "cnn-640": "configs/acktr/pong.yaml",
    "lstm-256": "configs/acktr/cartpole_novel.yaml",
}


def shipped_settings(path: str) -> dict[str, Any]:
    """The KFAC arguments our agents build from ``path`` (the learning rate aside)."""
    from agents.algorithm import KFAC_KEYS
    from agents.config import load_config

    cfg = load_config(path)
    return {key: getattr(cfg, key) for key in KFAC_KEYS}


def variants(key: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """K-FAC settings to time: exact full statistics, and each cheaper option asked for."""
    out: dict[str, dict[str, Any]] = {"exact": {}, f"shipped: {SHIPPED[key]}": {"shipped": True}}
    if key.startswith("cnn"):
        out["conv reduce"] = {"conv_approx": "reduce"}
    if args.statistics_rows:
        out[f"rows {args.statistics_rows}"] = {"statistics_rows": args.statistics_rows}
    if args.factor_update_interval > 1:
        t = args.factor_update_interval
        out[f"stats every {t}"] = {"factor_update_interval": t}
        if args.statistics_rows:
            out[f"rows {args.statistics_rows}, every {t}"] = {
                "statistics_rows": args.statistics_rows,
                "factor_update_interval": t,
            }
    if args.kl_guard:  # the bound is never reached: what the check itself costs
        out["exact, kl_guard"] = {"kl_guard": args.kl_guard}
        out[f"shipped: {SHIPPED[key]}, kl_guard"] = {"shipped": True, "kl_guard": args.kl_guard}
    if args.background:  # each variant so far, with its eigendecompositions in the background
        for label, kwargs in list(out.items()):
            if "shipped" not in kwargs:
                out[f"{label}, background"] = {**kwargs, "inverse_mode": "background"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks of 10 updates")
    parser.add_argument(
        "--only", default=",".join(CASES), help=f"comma-separated cases of {', '.join(CASES)}"
    )
    parser.add_argument(
        "--factor-update-interval",
        type=int,
        default=0,
        help="also time K-FAC with statistics only every T steps",
    )
    parser.add_argument(
        "--statistics-rows", type=int, default=0, help="also time statistics from M sampled rows"
    )
    parser.add_argument(
        "--background", action="store_true", help="also time inverse_mode='background'"
    )
    parser.add_argument(
        "--kl-guard",
        type=float,
        default=0.0,
        help="also time the KL guard with this kl_guard (1e9: it measures, never backtracks)",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.only.split(",")) - set(CASES))
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {', '.join(CASES)}")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(
        f"{'network':28s} {'RMSprop ms':>10s} {'K-FAC ms':>9s} {'ratio':>6s} "
        f"{'stats GMAC':>10s}  K-FAC variant"
    )
    for key in args.only.split(","):
        title, build, n = CASES[key]
        torch.manual_seed(0)
        batch = make_batch(key.split("-")[0], n, device)
        updates: dict[str, Callable[[], None]] = {}
        model = build().to(device)
        rms = torch.optim.RMSprop(model.parameters(), lr=7e-4, alpha=0.99, eps=1e-5)
        updates["rmsprop"] = functools.partial(rmsprop_update, model, rms, batch)
        gmac: dict[str, float] = {}
        for label, kwargs in variants(key, args).items():
            kmodel = build().to(device)
            if kwargs.pop("shipped", False):
                kwargs = {**shipped_settings(SHIPPED[key]), **kwargs}
            opt = KFAC(kmodel, **kwargs)
            updates[label] = functools.partial(kfac_update, kmodel, opt, batch)
            gmac[label] = statistics_gmac(kmodel, opt, batch, opt.factor_update_interval)
        ms = time_interleaved(updates, args.blocks, sync)
        base = ms.pop("rmsprop")
        for label, value in ms.items():
            print(
                f"{title:28s} {base:10.2f} {value:9.2f} {value / base:6.2f} "
                f"{gmac[label]:10.3f}  {label}",
                flush=True,
            )


if __name__ == "__main__":
    main()
