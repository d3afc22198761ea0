"""Cost of one K-FAC update against one RMSprop update, on ACKTR's two standard networks.

K-FAC update : forward + Fisher backward (statistics) + loss backward + KFAC.step
RMSprop update: forward + loss backward + RMSprop.step
Inverse (eigen) updates every 10 steps are amortised: each sample is the mean of a block of 10
updates, and the median over blocks is reported.

    python scripts/bench_optimizer.py [--device auto] [--blocks 7] [--only mlp|cnn]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_kfac import KFAC, ConvApprox


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
    opt.step()


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
    obs = torch.randn(n, 8) if kind == "mlp" else torch.rand(n, 4, 84, 84)
    n_actions = 4 if kind == "mlp" else 6
    return {
        "obs": obs.to(device),
        "actions": torch.randint(0, n_actions, (n,), device=device),
        "adv": torch.randn(n, device=device),
        "returns": torch.randn(n, device=device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks of 10 updates")
    parser.add_argument("--only", choices=["mlp", "cnn"])
    parser.add_argument(
        "--factor-update-interval",
        type=int,
        default=0,
        help="also time K-FAC with statistics only every T steps",
    )
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    intervals = [1] + ([args.factor_update_interval] if args.factor_update_interval > 1 else [])
    cases: list[tuple[str, str, Callable[[], nn.Module], int, list[ConvApprox]]] = [
        ("mlp", "MLP 64-64 tanh, batch 320", mlp_policy, 320, ["expand"]),
        ("cnn", "Nature CNN 84x84x4, batch 640", nature_cnn_policy, 640, ["expand", "reduce"]),
    ]
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'network':32s} {'RMSprop ms':>10s} {'K-FAC ms':>10s} {'ratio':>6s}  K-FAC variant")
    for key, title, build, n, approxes in cases:
        if args.only and args.only != key:
            continue
        torch.manual_seed(0)
        batch = make_batch(key, n, device)
        updates: dict[str, Callable[[], None]] = {}
        model = build().to(device)
        rms = torch.optim.RMSprop(model.parameters(), lr=7e-4, alpha=0.99, eps=1e-5)
        updates["rmsprop"] = functools.partial(rmsprop_update, model, rms, batch)
        for approx in approxes:
            for interval in intervals:
                kmodel = build().to(device)
                opt = KFAC(kmodel, conv_approx=approx, factor_update_interval=interval)
                label = f"stats every {interval}" + (f", conv {approx}" if key == "cnn" else "")
                updates[label] = functools.partial(kfac_update, kmodel, opt, batch)
        ms = time_interleaved(updates, args.blocks, sync)
        base = ms.pop("rmsprop")
        for label, value in ms.items():
            print(
                f"{title:32s} {base:10.2f} {value:10.2f} {value / base:6.2f}  {label}", flush=True
            )


if __name__ == "__main__":
    main()
