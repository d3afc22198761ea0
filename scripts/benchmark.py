"""Our agents next to Stable-Baselines3 (rl-zoo hyperparameters), same seeds, one run.

``--algos acktr,a2c`` (default) compares our ACKTR with SB3 A2C; ``--algos ppo_kfac,ppo`` our
PPO-KFAC with SB3 PPO. SB3's A2C and PPO run with rl-baselines3-zoo's hyperparameters, read from
the installed rl_zoo3 package; ``sb3_acktr`` / ``sb3_ppo_kfac`` are ``rl_kfac.sb3.ACKTR`` /
``PPOKFAC`` (SB3's training loops with K-FAC) with the settings of our config for the task
(``agents.sb3_settings``). No hyperparameter is restated here.

Metric: the first timestep at which the mean return of the last 100 finished training episodes
reaches the environment's threshold. Writes ``<out>/runs.csv`` (one row per run),
``<out>/episodes.csv`` (every finished episode) and ``<out>/curves.png``.

    python scripts/benchmark.py --env CartPole-v1 --seeds 5
    python scripts/benchmark.py --env LunarLander-v3 --seeds 3
    python scripts/benchmark.py --env CartPole-v1 --seeds 5 --algos ppo_kfac,ppo
    python scripts/benchmark.py --env HalfCheetah-v5 --seeds 3 --algos ppo_kfac,ppo
    python scripts/benchmark.py --env CartPole-v1 --seeds 5 --algos sb3_acktr,a2c
    python scripts/benchmark.py --env CartPole-v1 --seeds 1 --speed   # wall time, same batch
    python scripts/benchmark.py --ingest runs/pong_acktr_s0   # a finished train.py run
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import add_override_argument
from agents.provenance import provenance

TASKS: dict[str, dict[str, Any]] = {
    # threshold, budget, our configs, and the key of rl-baselines3-zoo's a2c.yml / ppo.yml whose
    # hyperparameters the SB3 reference runs use (rl_zoo3's own files, as installed)
    "CartPole-v1": {
        "threshold": 475.0,
        "timesteps": 100_000,
        "config": "configs/acktr/cartpole.yaml",
        "ppo_kfac_config": "configs/ppo_kfac/cartpole.yaml",
        "zoo": "CartPole-v1",
    },
    "LunarLander-v3": {
        "threshold": 200.0,
        "timesteps": 500_000,
        "tuning_seeds": 5,  # our configs tuned on seeds 0-4; the report lists later ones held out
        "config": "configs/acktr/lunarlander.yaml",
        "ppo_kfac_config": "configs/ppo_kfac/lunarlander.yaml",
        "zoo": "LunarLander-v3",
    },
    "HalfCheetah-v5": {
        "threshold": 5819.0,  # SB3 PPO's published 1M-step result (rl-baselines3-zoo benchmark)
        "timesteps": 1_000_000,
        "config": "configs/acktr/halfcheetah.yaml",
        "ppo_kfac_config": "configs/ppo_kfac/halfcheetah.yaml",
        "zoo": "HalfCheetah-v4",  # rl-zoo's MuJoCo settings are listed under v4
    },
    # a third-party package's environment (Farama's minigrid): our agents see the 7x7x3 grid
    # through ImgObsWrapper (configs/*/minigrid.yaml), SB3 PPO rl-zoo's FlatObsWrapper and MLP
    "MiniGrid-DoorKey-5x5-v0": {
        "threshold": 0.9,  # the optimum is about 0.96 (1 - 0.9 · steps / 250, ~10 steps)
        "timesteps": 100_000,
        "config": "configs/acktr/minigrid.yaml",
        "ppo_kfac_config": "configs/ppo_kfac/minigrid.yaml",
        "zoo": "MiniGrid-DoorKey-5x5-v0",
        "env_packages": ["minigrid"],
    },
    # Atari runs are long: made with scripts/train.py (resumable), added with --ingest
    "ALE/Pong-v5": {
        "threshold": 18.0,
        "timesteps": 2_000_000,
        "config": "configs/acktr/pong.yaml",
        "ppo_kfac_config": "configs/ppo_kfac/pong.yaml",
        "zoo": "PongNoFrameskip-v4",
    },
    "ALE/Breakout-v5": {
        "threshold": 31.8,  # the human score in the ACKTR paper's table
        "timesteps": 2_000_000,
        "config": "configs/acktr/breakout.yaml",
        "ppo_kfac_config": "configs/ppo_kfac/breakout.yaml",
        "zoo": "BreakoutNoFrameskip-v4",
    },
}
OURS = ("acktr", "ppo_kfac")  # our agents
SB3 = ("a2c", "ppo", "sb3_acktr", "sb3_ppo_kfac")  # SB3 classes: rl-zoo's settings / our configs


def zoo_settings(algo: str, env: str) -> dict[str, Any]:
    """The rl-zoo hyperparameter entry of an SB3 run: rl-zoo's own for A2C and PPO, made from
    our config for rl_kfac.sb3's classes (:mod:`agents.sb3_settings`)."""
    task = TASKS[env]
    if algo in ("sb3_acktr", "sb3_ppo_kfac"):
        from agents.config import load_config
        from agents.sb3_settings import zoo_entry

        return zoo_entry(load_config(task["config" if algo == "sb3_acktr" else "ppo_kfac_config"]))
    import rl_zoo3
    import yaml

    path = Path(rl_zoo3.__file__).parent / "hyperparams" / f"{algo}.yml"
    return dict(yaml.safe_load(path.read_text())[task["zoo"]])


def first_to_threshold(episodes: list[tuple[int, float]], threshold: float) -> int | None:
    returns = [r for _, r in episodes]
    for i in range(100, len(returns) + 1):
        if np.mean(returns[i - 100 : i]) >= threshold:
            return episodes[i - 1][0]
    return None


def low_after_threshold(episodes: list[tuple[int, float]], threshold: float) -> float | None:
    """The lowest last-100 mean after it first reached ``threshold`` (a late collapse shows
    here); ``None`` if it never did."""
    returns = [r for _, r in episodes]
    means = [float(np.mean(returns[i - 100 : i])) for i in range(100, len(returns) + 1)]
    first = next((i for i, m in enumerate(means) if m >= threshold), None)
    return None if first is None else round(min(means[first:]), 1)


def run_ours(
    algo: str, env: str, seed: int, timesteps: int, overrides: list[str]
) -> dict[str, Any]:
    import torch

    from agents.config import load_config
    from agents.trainer import Trainer

    torch.set_num_threads(1)
    config = TASKS[env]["config" if algo == "acktr" else "ppo_kfac_config"]
    cfg = load_config(config, [*overrides, f"seed={seed}", f"total_timesteps={timesteps}"])
    root = Path("runs/benchmark")
    root.mkdir(parents=True, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=f"{env}_{algo}_s{seed}_", dir=root)  # TensorBoard logs
    start = time.perf_counter()
    result = Trainer(cfg, run_dir, progress=False).train()
    wall = time.perf_counter() - start
    return {
        "episodes": [(s, r) for s, r, _ in result.episodes],
        "wall": wall,
        "update_share": result.update_time / wall,
    }


def run_sb3(algo: str, env: str, seed: int, timesteps: int, zoo: dict[str, Any]) -> dict[str, Any]:
    """One SB3 run from an rl-zoo hyperparameter entry (``lin_<x>`` schedules, ``normalize``,
    ``policy_kwargs`` strings read as rl-zoo reads them)."""
    import torch
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from agents.envs import import_env_packages, resolve_wrappers
    from rl_kfac.sb3 import ACKTR, PPOKFAC

    torch.set_num_threads(1)
    kwargs = dict(zoo)
    n_envs, normalize = kwargs.pop("n_envs", 1), kwargs.pop("normalize", False)
    policy = kwargs.pop("policy", "MlpPolicy")
    kwargs.pop("n_timesteps", None)
    for key in ("learning_rate", "clip_range"):  # rl-zoo's "lin_<value>": linear decay to 0
        value = kwargs.get(key)
        if isinstance(value, str) and value.startswith("lin_"):
            kwargs[key] = functools.partial(_linear, float(value[4:]))
    if isinstance(kwargs.get("policy_kwargs"), str):  # rl-zoo evaluates these with nn in scope
        kwargs["policy_kwargs"] = eval(kwargs["policy_kwargs"], {"nn": torch.nn})

    class Episodes(BaseCallback):
        """Finished episodes, and the time spent in SB3's update with its logging (from the end
        of one rollout to the start of the next)."""

        def __init__(self) -> None:
            super().__init__()
            self.episodes: list[tuple[int, float]] = []
            self.update_time = 0.0
            self._rollout_end: float | None = None

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.episodes.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

        def _on_rollout_end(self) -> None:
            self._rollout_end = time.perf_counter()

        def _on_rollout_start(self) -> None:
            if self._rollout_end is not None:
                self.update_time += time.perf_counter() - self._rollout_end

        def _on_training_end(self) -> None:
            self._on_rollout_start()

    wrappers = kwargs.pop("env_wrapper", [])  # rl-zoo: one entry or a list of them
    wrappers = resolve_wrappers(wrappers if isinstance(wrappers, list) else [wrappers])
    import_env_packages(TASKS[env].get("env_packages", []))

    def wrap(e: Any) -> Any:
        for cls, options in wrappers:
            e = cls(e, **options)
        return e

    envs = make_vec_env(env, n_envs=n_envs, seed=seed, wrapper_class=wrap)
    if normalize:
        options = eval(normalize, {}) if isinstance(normalize, str) else {}
        envs = VecNormalize(envs, gamma=kwargs.get("gamma", 0.99), **options)
    cls = {"a2c": A2C, "ppo": PPO, "sb3_acktr": ACKTR, "sb3_ppo_kfac": PPOKFAC}[algo]
    model = cls(policy, envs, seed=seed, device="cpu", **kwargs)
    callback = Episodes()
    start = time.perf_counter()
    model.learn(timesteps, callback=callback)
    wall = time.perf_counter() - start
    return {
        "episodes": callback.episodes,
        "wall": wall,
        "update_share": callback.update_time / wall,
    }


REPORT_BEGIN = "<!-- results: generated by `python scripts/benchmark.py --report`; do not edit -->"
REPORT_END = "<!-- end of generated results -->"
NAMES = {
    "acktr": "ACKTR (rl-kfac)",
    "ppo_kfac": "PPO-KFAC (rl-kfac)",
    "a2c": "A2C (SB3, rl-zoo)",
    "ppo": "PPO (SB3, rl-zoo)",
    "sb3_acktr": "rl_kfac.sb3.ACKTR",
    "sb3_ppo_kfac": "rl_kfac.sb3.PPOKFAC",
}  # table and plot labels


def _k(steps: float) -> str:
    return f"{steps / 1000:.1f}k"


def render_report(root: Path) -> str:
    """The README's results table from every ``<root>/<env>/<comparison>/runs.csv``: one row
    per task, algorithm and seed group (tuning seeds, held-out seeds where the task names them).
    """
    lines = [
        "| task | algorithm | seeds | reached | median steps | steps per seed "
        "| final last-100: median; per seed | wall per run | commit |",
        "| --- | --- | --- | --- | ---: | --- | --- | ---: | --- |",
    ]
    for path in sorted(root.glob("*/*/runs.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        task = TASKS[rows[0]["env"]]
        tuned = task.get("tuning_seeds")
        for algo in dict.fromkeys(r["algo"] for r in rows):
            mine = [r for r in rows if r["algo"] == algo]
            if tuned is None or algo not in OURS:  # only our configs are tuned
                lines.append(_report_row(task, mine, ""))
                continue
            for role, group in (
                ("tuning", [r for r in mine if int(r["seed"]) < tuned]),
                ("held out", [r for r in mine if int(r["seed"]) >= tuned]),
            ):
                if group:
                    lines.append(_report_row(task, group, f" ({role})"))
    return "\n".join(lines)


def _report_row(task: dict[str, Any], runs: list[dict[str, str]], role: str) -> str:
    """Unreached runs count as later than the budget in the median."""
    env, algo = runs[0]["env"], runs[0]["algo"]
    firsts = [float(r["first_to_threshold"] or "inf") for r in runs]
    finals = [float(r["final_last100"]) for r in runs]
    seeds = [int(r["seed"]) for r in runs]
    contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
    med = statistics.median(firsts)
    fmt = ".1f" if task["threshold"] < 10 else ".0f"  # returns of order 1 (MiniGrid)
    cells = [
        f"{env}, ≥ {task['threshold']:g}, {int(runs[0]['timesteps']) // 1000}k steps",
        NAMES.get(algo, algo),
        (f"{seeds[0]}-{seeds[-1]}" if contiguous else ",".join(map(str, seeds))) + role,
        f"{sum(f != float('inf') for f in firsts)} of {len(runs)}",
        "never" if med == float("inf") else _k(med),
        ", ".join("never" if f == float("inf") else _k(f) for f in firsts),
        f"{statistics.median(finals):{fmt}}; " + ", ".join(f"{x:{fmt}}" for x in finals),
        _walls(runs),
        ", ".join(sorted({r["commit"] for r in runs})),
    ]
    return "| " + " | ".join(cells) + " |"


def _walls(runs: list[dict[str, str]]) -> str:
    """Median wall time per run, per device when runs were made on different hardware (rows
    from before devices were recorded ran on this project's CPU machine)."""
    by_device: dict[str, list[float]] = {}
    for r in runs:
        by_device.setdefault(r.get("device") or "cpu", []).append(float(r["wall_s"]))
    if list(by_device) == ["cpu"]:
        return f"{statistics.median(by_device['cpu']):.0f} s"
    return "; ".join(f"{statistics.median(w):.0f} s ({d})" for d, w in sorted(by_device.items()))


def _report_span(text: str) -> tuple[int, int]:
    return text.index(REPORT_BEGIN) + len(REPORT_BEGIN), text.index(REPORT_END)


def readme_block(text: str) -> str:
    """What the README holds between the report markers."""
    start, end = _report_span(text)
    return text[start:end].strip("\n")


def write_report(readme: Path, root: Path) -> None:
    text = readme.read_text()
    start, end = _report_span(text)
    readme.write_text(text[:start] + "\n" + render_report(root) + "\n" + text[end:])


def _merge(
    out: Path, rows: list[dict[str, Any]], episodes: list[tuple[Any, ...]]
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """These runs plus the ones already in ``out`` for other (algo, seed) pairs, sorted."""
    new = {(r["algo"], int(r["seed"])) for r in rows}
    if (out / "runs.csv").exists():
        with open(out / "runs.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if (r["algo"], int(r["seed"])) not in new] + rows
        with open(out / "episodes.csv", newline="") as f:
            old = [(a, int(s), int(t), float(x)) for a, s, t, x in list(csv.reader(f))[1:]]
        episodes = [e for e in old if (e[0], e[1]) not in new] + episodes
    rows.sort(key=lambda r: (r["algo"], int(r["seed"])))
    episodes.sort(key=lambda e: (e[0], e[1]))  # stable: each run's episodes keep their order
    return rows, episodes


def _seed_list(text: str) -> range:
    first, sep, last = text.partition("-")
    try:
        seeds = range(int(first), int(last) + 1) if sep else range(int(first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or FIRST-LAST, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def _linear(initial: float, progress_remaining: float) -> float:
    return progress_remaining * initial


def job(args: tuple[str, str, int, int, bool, list[str]]) -> dict[str, Any]:
    algo, env, seed, timesteps, speed, overrides = args
    task = TASKS[env]
    if algo in OURS:
        out = run_ours(algo, env, seed, timesteps, overrides)
    else:
        zoo = zoo_settings(algo, env)
        if speed:  # same batch shape as our config: n_envs x n_steps
            from agents.config import load_config

            cfg = load_config(task["ppo_kfac_config" if "ppo" in algo else "config"])
            zoo.update(n_envs=cfg.n_envs, n_steps=cfg.n_steps)
        out = run_sb3(algo, env, seed, timesteps, zoo)
    out.update(algo=algo, env=env, seed=seed, timesteps=timesteps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", choices=sorted(TASKS), default="CartPole-v1")
    parser.add_argument(
        "--seeds", type=_seed_list, default=range(5), help="N (seeds 0..N-1) or FIRST-LAST"
    )
    parser.add_argument("--timesteps", type=int, help="default: the task's budget")
    parser.add_argument("--algos", default="acktr,a2c")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="SB3 runs with our n_envs x n_steps")
    add_override_argument(parser, "override our agents' config (repeatable)")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument(
        "--report", action="store_true", help="rewrite README.md's results table from --out"
    )
    parser.add_argument(
        "--ingest", nargs="+", metavar="RUN_DIR", help="add finished scripts/train.py runs"
    )
    parser.add_argument("--commit", help="with --ingest: the commit of runs that lack one")
    parser.add_argument("--device", help="with --ingest: the device of runs that lack one")
    args = parser.parse_args()
    if args.report:
        write_report(Path("README.md"), Path(args.out))
        print(f"README.md: results table rewritten from {args.out}/*/*/runs.csv")
        return
    if args.ingest:
        ingest([Path(d) for d in args.ingest], Path(args.out), args.commit, args.device)
        return
    unknown = sorted(set(args.algos.split(",")) - set(OURS + SB3))
    if unknown:
        parser.error(f"unknown --algos {unknown}; choose from {', '.join(OURS + SB3)}")
    task = TASKS[args.env]
    timesteps = args.timesteps or task["timesteps"]
    jobs = [
        (a, args.env, s, timesteps, args.speed, args.overrides)
        for s in args.seeds
        for a in args.algos.split(",")
    ]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(job, jobs)

    out = results_dir(Path(args.out), args.env, [*args.algos.split(","), *args.overrides])
    made_by = {**provenance(), "threads": "1", "device": "cpu"}
    rows = [run_row(r, task, made_by) for r in results]
    episodes = [(r["algo"], r["seed"], st, x) for r in results for st, x in r["episodes"]]
    rows, episodes = write_results(out, rows, episodes, task, args.env)

    ours = f", ours with {' '.join(args.overrides)}" if args.overrides else ""
    seeds = f"seeds {args.seeds[0]}..{args.seeds[-1]}"
    print(f"{args.env}: threshold {task['threshold']}, {timesteps} steps, {seeds}{ours}")
    print(
        f"{'algo':12s} {'reached':>8s} {'median first':>13s} {'final last-100':>15s} "
        f"{'wall s':>7s} {'update s':>9s}"
    )
    for algo in args.algos.split(","):
        mine = [row for row in rows if row["algo"] == algo]
        firsts = [row["first_to_threshold"] for row in mine]
        reached = [f for f in firsts if f is not None]
        # unreached runs count as "later than the budget" for the median
        med = statistics.median([f if f is not None else float("inf") for f in firsts])
        finals = statistics.median(row["final_last100"] for row in mine)
        wall = statistics.median(row["wall_s"] for row in mine)
        med_s = "never" if med == float("inf") else f"{med / 1000:.1f}k"
        n = f"{len(reached)} of {len(mine)}"
        upd = statistics.median(row["wall_s"] * (row["update_share"] or 0) for row in mine)
        print(f"{algo:12s} {n:>8s} {med_s:>13s} {finals:15.1f} {wall:7.1f} {upd:9.1f}")
        print(f"       per seed: {firsts}")
        lows = [row["low_after_threshold"] for row in mine]
        print(f"       lowest last-100 after reaching the threshold, per seed: {lows}")
    print(f"wrote {out}/runs.csv, episodes.csv, curves.png")


def run_row(r: dict[str, Any], task: dict[str, Any], made_by: dict[str, Any]) -> dict[str, Any]:
    """One ``runs.csv`` row from a finished run's episodes ``(step, return)`` and timings."""
    eps = r["episodes"]
    lasts = [np.mean([x for _, x in eps[max(0, i - 100) : i]]) for i in range(100, len(eps) + 1)]
    share = r["update_share"]
    return {
        "algo": r["algo"],
        "env": r["env"],
        "seed": r["seed"],
        "timesteps": r["timesteps"],
        "first_to_threshold": first_to_threshold(eps, task["threshold"]),
        "final_last100": round(float(np.mean([x for _, x in eps[-100:]])), 1),
        "best_last100": round(float(max(lasts)), 1) if lasts else None,
        "low_after_threshold": low_after_threshold(eps, task["threshold"]),
        "wall_s": round(r["wall"], 1),
        "update_share": None if share is None else round(share, 3),
        **made_by,
    }


def write_results(
    out: Path,
    rows: list[dict[str, Any]],
    episodes: list[tuple[Any, ...]],
    task: dict[str, Any],
    env: str,
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Merge into ``out``'s runs.csv and episodes.csv (other runs there stay), redraw the
    curves; the merged rows and episodes."""
    out.mkdir(parents=True, exist_ok=True)
    rows, episodes = _merge(out, rows, episodes)
    with open(out / "runs.csv", "w", newline="") as f:
        columns = list(dict.fromkeys(k for r in rows for k in r))  # older files: fewer columns
        table = csv.DictWriter(f, fieldnames=columns, restval="")
        table.writeheader()
        table.writerows(rows)
    with open(out / "episodes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algo", "seed", "timestep", "return"])
        writer.writerows(episodes)
    plot(episodes, task["threshold"], out / "curves.png", env)
    return rows, episodes


def ingest(run_dirs: list[Path], root: Path, commit: str | None, device: str | None = None) -> None:
    """Add finished ``scripts/train.py`` runs (long ones, resumed over several sittings with
    ``--resume``) to ``<root>/<env>/<algo>/``: their config, ``episodes.csv`` and
    ``result.json`` (whose commit and device, for runs made before they were recorded, can be
    named)."""
    import yaml

    from agents.episode_log import read_episodes

    for run in run_dirs:
        summary = json.loads((run / "result.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        if summary["timesteps"] < cfg["total_timesteps"]:
            raise SystemExit(f"{run} is not finished: {summary['timesteps']} steps")
        env, algo = cfg["env_id"], cfg["algo"]
        task = TASKS[env]
        made_by = {
            key: str(summary.get(key, "unknown")) for key in ("commit", "torch", "gymnasium", "sb3")
        }
        made_by["commit"] = commit or made_by["commit"]
        made_by["threads"] = str(summary.get("threads", ""))
        made_by["device"] = device or str(summary.get("device", "unknown"))
        wall = summary.get("wall_time_total_s", summary["wall_time_s"])
        eps = [(s, r) for s, r, _ in read_episodes(run / "episodes.csv")]
        result = {
            "algo": algo,
            "env": env,
            "seed": cfg["seed"],
            "timesteps": summary["timesteps"],
            "episodes": eps,
            "wall": wall,
            "update_share": summary["update_time_s"] / summary["wall_time_s"],
        }
        row = run_row(result, task, made_by)
        write_results(
            results_dir(root, env, [algo]),
            [row],
            [(algo, cfg["seed"], s, r) for s, r in eps],
            task,
            env,
        )
        print(f"{run}: {algo} on {env}, seed {cfg['seed']}: {row}")


def results_dir(root: Path, env: str, parts: list[str]) -> Path:
    return root / env.replace("/", "-") / "_".join(parts)


def plot(episodes: list[tuple[Any, ...]], threshold: float, path: Path, env: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {
        "acktr": "tab:red",
        "a2c": "tab:blue",
        "ppo_kfac": "tab:orange",
        "ppo": "tab:green",
        "sb3_acktr": "tab:purple",
        "sb3_ppo_kfac": "tab:brown",
    }
    runs: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for algo, seed, step, ret in episodes:
        runs.setdefault((algo, seed), []).append((step, ret))
    labelled = set()
    for (algo, _), eps in runs.items():
        if len(eps) < 2:
            continue
        steps = [st for st, _ in eps]
        rets = np.array([x for _, x in eps])
        smooth = [rets[max(0, i - 99) : i + 1].mean() for i in range(len(rets))]
        label = None if algo in labelled else NAMES.get(algo, algo)
        labelled.add(algo)
        ax.plot(steps, smooth, color=colors.get(algo, "gray"), alpha=0.6, lw=1, label=label)
    ax.axhline(threshold, color="k", ls="--", lw=0.8)
    ax.set(xlabel="timesteps", ylabel="mean return, last 100 episodes", title=env)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
