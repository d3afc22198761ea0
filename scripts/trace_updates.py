"""Record an agent's updates step by step, and find where two recordings first part.

Made to answer "did this commit change the optimizer's behaviour, or only its rounding?": record
the same config and seed at two commits (``PYTHONPATH=<checkout of commit X>`` selects the code),
then ``compare`` names the first update and the first quantity that differ, and how far apart.

    PYTHONPATH=../old python scripts/trace_updates.py record --config C --seed 2 --out old.pt
    python scripts/trace_updates.py record --config C --seed 2 --out new.pt
    python scripts/trace_updates.py compare old.pt new.pt

Per update it keeps the rollout (observations, sampled actions), the gradients going into the
step, the trust-region scale ν, and the parameters after the step; for the first ``--detail``
updates also what K-FAC saw (each layer's recorded inputs and output gradients), its running
factors A and G and their eigenvalues. ``--factor-dtype float64`` runs K-FAC's factors and
preconditioning in float64. One torch thread, so reductions run in a fixed order.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

ALWAYS = ("actions", "grads", "params", "step_scale")  # kept for every update; the rest: --detail


def record(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    from agents.config import load_config
    from agents.trainer import Trainer
    from rl_kfac import KFAC
    from rl_kfac.statistics import FactorStore

    detail = args.detail
    log: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    dtype = getattr(torch, args.factor_dtype)

    # A forensic tool: it wraps the optimizer's own methods to see what they see.
    init = KFAC.__init__
    add_records = FactorStore.add
    step = KFAC.step

    def patched_init(self: KFAC, *a: Any, **kw: Any) -> None:
        kw["factor_dtype"] = dtype
        init(self, *a, **kw)

    def patched_add(self: FactorStore, records: list[Any]) -> None:
        if len(log) < detail and records:
            current["records"] = [(r.inputs.clone(), r.grad_output.clone()) for r in records]
            current["batch"] = _batch_factors(records)
        add_records(self, records)

    def patched_step(self: KFAC, closure: Any = None, *, kl: Any = None) -> Any:
        params = [p for g in self.param_groups for p in g["params"]]
        current["grads"] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        out = step(self, closure, kl=kl)
        current["params"] = torch.cat([p.detach().flatten() for p in params]).clone()
        current["step_scale"] = self.diagnostics.step_scale
        if len(log) < detail:
            for key in ("A", "G", "eA", "eG"):
                current[key] = {
                    b.name: self.state[b.weight][key].clone()
                    for b in self.blocks
                    if key in self.state[b.weight]
                }
        return out

    KFAC.__init__, KFAC.step = patched_init, patched_step  # type: ignore[method-assign]
    FactorStore.add = patched_add  # type: ignore[method-assign]
    cfg = load_config(args.config, [f"seed={args.seed}", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        total = args.updates or -(-cfg.total_timesteps // (cfg.n_envs * cfg.n_steps))
        for u in range(total):
            batch = trainer.collector.collect()
            trainer.timesteps += len(batch)
            trainer.algo.update(batch, trainer.timesteps / cfg.total_timesteps)
            entry = {"obs": batch.obs.clone(), "actions": batch.actions.clone(), **current}
            if u >= detail:
                entry = {k: v for k, v in entry.items() if k in ALWAYS}
            log.append(entry)
            current = {}
        trainer.close()
    torch.save({"config": args.config, "seed": args.seed, "log": log}, args.out)
    print(f"{len(log)} updates -> {args.out}")


def _batch_factors(records: list[Any]) -> dict[str, dict[str, torch.Tensor]]:
    """This batch's A and G per layer in float64, straight from the recorded rows."""
    rows: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for block, a, g, _ in records:
        x, sx = block.input_rows(a.double())
        y, sy = block.grad_rows(g.double())
        rows.setdefault(block, []).append((sx * x.T @ x, sy * y.T @ y))
    return {
        key: {b.name: torch.stack([r[i] for r in calls]).mean(0) for b, calls in rows.items()}
        for i, key in enumerate(("A", "G"))
    }


def _rel(a: Any, b: Any) -> float:
    """Largest |a - b| relative to the largest |a| (0 when bitwise equal)."""
    if isinstance(a, float):
        return 0.0 if a == b else abs(a - b) / max(abs(a), 1e-30)
    if isinstance(a, dict):
        return max(_rel(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return max((_rel(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, tuple):
        return max(_rel(x, y) for x, y in zip(a, b))
    if a.shape != b.shape:
        return float("inf")
    if torch.equal(a, b):
        return 0.0
    a, b = a.detach(), b.detach()
    scale = a.abs().max().double().clamp_min(1e-30)
    return float((a.double() - b.double()).abs().max() / scale)


def compare(args: argparse.Namespace) -> None:
    logs = [torch.load(p, weights_only=False)["log"] for p in (args.a, args.b)]
    n = min(len(x) for x in logs)
    order = ["obs", "actions", "records", "batch", "grads", "A", "G", "eA", "eG", "step_scale"]
    order.append("params")
    first: dict[str, tuple[int, float]] = {}
    for u in range(n):
        ea, eb = logs[0][u], logs[1][u]
        for key in order:
            if key in ea and key in eb and key not in first:
                r = _rel(ea[key], eb[key])
                if r > 0:
                    first[key] = (u, r)
    print(f"{n} updates compared; first difference per quantity (update index, relative size):")
    for key in order:
        where = f"update {first[key][0]}, {first[key][1]:.2e}" if key in first else "identical"
        print(f"  {key:>10}: {where}")
    print("relative parameter difference after update k:")
    ks = [k for k in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 1500) if k < n]
    rel = [_rel(logs[0][k]["params"], logs[1][k]["params"]) for k in ks]
    print("  " + "  ".join(f"{k}: {r:.1e}" for k, r in zip(ks, rel)))
    same = [torch.equal(logs[0][u]["actions"], logs[1][u]["actions"]) for u in range(n)]
    if all(same):
        print("the sampled actions agree in every update")
    else:
        print(f"sampled actions first differ in the rollout of update {same.index(False)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="run a config and record its updates")
    rec.add_argument("--config", required=True)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rec.add_argument("--updates", type=int, default=0, help="0: the config's whole run")
    rec.add_argument("--detail", type=int, default=100, help="updates recorded in full")
    rec.add_argument("--factor-dtype", default="float32", choices=("float32", "float64"))
    rec.add_argument("--out", required=True)
    cmp = sub.add_parser("compare", help="first differences between two recordings")
    cmp.add_argument("a")
    cmp.add_argument("b")
    args = parser.parse_args()
    record(args) if args.cmd == "record" else compare(args)


if __name__ == "__main__":
    main()
