"""How far K-FAC's trust-region model of an update's KL is from the KL the update really had.

    python scripts/kl_model_check.py --config configs/acktr/hopper.yaml --updates 100

Trains the config (one torch thread) and, for each update, compares

- the model: ``½ ΔᵀF̂Δ`` over the policy's parameters, with the K-FAC Fisher F̂ the clip uses
  (from the step and its gradient: ``½ lr ν ⟨v, g⟩`` with momentum 0, ``Δ = −lr ν v``); the clip
  keeps the policy's and the value function's parts together below ``kl_clip/2``;
- the exact quadratic ``½ ΔᵀFΔ`` with the policy's exact Fisher F: ``KL(π_θ ‖ π_{θ+tΔ}) / t²``
  at ``t = 0.1`` (smaller t drowns a small KL in float32 rounding);
- the measured ``KL(π_θ ‖ π_{θ+Δ})`` on the batch (the agents' ``train/approx_kl``).

The exact quadratic over the model is K-FAC's error in the direction it steps; the measured KL
over the exact quadratic is how far the update left the quadratic regime. ACKTR configs only
(one step per update), with momentum 0 and no ``vf_steps`` (whose steps replace the gradient).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from agents.algorithm import Stats
from agents.cli import add_override_argument
from agents.config import load_config
from agents.rollout import Batch, evaluate
from agents.trainer import Trainer


class _Enough(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    add_override_argument(parser, "override a config value, e.g. --set stat_decay=0.9")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"seed={args.seed}", "threads=1"])
    if cfg.algo != "acktr" or cfg.momentum != 0 or cfg.vf_steps or cfg.kl_clip is None:
        parser.error(
            "needs an ACKTR config with momentum 0, vf_steps 0 and a kl_clip (the model is read "
            "from the update's one step)"
        )
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    policy, algo = trainer.policy, trainer.algo
    value_ids = {id(p) for p in policy.value_parameters()}
    update = algo.update
    rows: list[tuple[int, float, float, float, float]] = []

    def checked_update(batch: Batch, progress: float) -> Stats:
        old = [p.detach().clone() for p in policy.parameters()]
        with torch.no_grad():
            before = evaluate(policy, batch)[0].detach()
        stats = update(batch, progress)
        nu = algo.optimizer.diagnostics.step_scale
        lr = algo.optimizer.param_groups[0]["lr"]
        new = [p.detach().clone() for p in policy.parameters()]
        pairs = list(zip(policy.parameters(), old, new))
        with torch.no_grad():
            model = (
                -0.5
                * lr
                * nu
                * sum(
                    float(((b - a) * p.grad).sum())
                    for p, a, b in pairs
                    if id(p) not in value_ids and p.grad is not None
                )
            )
            for p, a, b in pairs:
                p.copy_(a + 0.1 * (b - a))
            exact = float(before.kl(evaluate(policy, batch)[0]).mean()) / 0.01
            for p, _, b in pairs:
                p.copy_(b)
        rows.append((trainer.updates, nu, model, exact, float(stats["train/approx_kl"])))
        if len(rows) >= args.updates:
            raise _Enough
        return stats

    algo.update = checked_update  # type: ignore[method-assign]
    try:
        trainer.train()
    except _Enough:
        trainer.close()
    print(f"{'update':>6} {'nu':>6} {'model':>9} {'exact quad':>10} {'measured':>9}")
    for row in rows[:: max(1, len(rows) // 20)] if len(rows) > 30 else rows:
        print("{:6d} {:6.3f} {:9.5f} {:10.5f} {:9.5f}".format(*row))
    a = np.array([r for r in rows if r[2] > 0 and r[3] > 0])
    model_error, nonlinearity = np.median(a[:, 3] / a[:, 2]), np.median(a[:, 4] / a[:, 3])
    print(
        f"median over {len(a)} updates: exact quadratic / model {model_error:.1f}, "
        f"measured / exact quadratic {nonlinearity:.2f}"
    )


if __name__ == "__main__":
    main()
