"""Benchmark suites: our agents next to Stable-Baselines3 (rl-zoo hyperparameters), resumable.

One run is (algorithm, environment, seed); a suite's default plan is in ``agents.bench.suites``
(``--envs``, ``--algos``, ``--seeds`` narrow it). Runs already in ``bench_results/<suite>/runs.csv``
are skipped; an interrupted run continues from its checkpoint in ``runs/benchmark/`` when the
same command is given again. Each finished run is appended to ``runs.csv`` and ``episodes.csv``
and its environment's curves are redrawn (``<env>.png``).

    python scripts/benchmark.py --suite classic --list          # the plan: done, partial, to do
    python scripts/benchmark.py --suite classic                 # every run not yet done
    python scripts/benchmark.py --suite classic --envs CartPole-v1 --algos acktr,a2c --seeds 0-4
    python scripts/benchmark.py --suite mujoco --envs Hopper-v5 --algos ppo_kfac --seeds 0-2
    python scripts/benchmark.py --report          # README tables from the committed results
    python scripts/benchmark.py --ingest runs/pong_acktr_s0     # a finished scripts/train.py run

Experiments (``--set`` overrides of our configs, ``--speed``, ``--timesteps``) must name their own
``--out`` (``bench_results/experiments/<name>``: the README shows them beside the shipped rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import statistics
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from agents.bench.report import write_readme
from agents.bench.results import SuiteResults, run_row
from agents.bench.runs import (
    RunInProgress,
    RunSpec,
    aside,
    episodes,
    exit_with_parent,
    run,
    zoo_settings,
)
from agents.bench.suites import ALGOS, OURS, SB3_KFAC, SUITES, find_task
from agents.cli import add_override_argument

DEFAULT_OUT = "bench_results"


def _seed_list(text: str) -> range:
    first, sep, last = text.partition("-")
    try:
        seeds = range(int(first), int(last) + 1) if sep else range(int(first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or FIRST-LAST, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    """(algo, env, seed, timesteps) of every run the arguments ask for."""
    tasks = SUITES[args.suite]
    envs = args.envs.split(",") if args.envs else list(tasks)
    algos = args.algos.split(",") if args.algos else None
    jobs = []
    for env in envs:
        task = tasks[env]
        for algo in algos or list(task.plan):
            seeds = args.seeds if args.seeds is not None else task.plan.get(algo, range(0))
            jobs += [(algo, env, s, args.timesteps or task.timesteps) for s in seeds]
    return jobs


def run_dir(args: argparse.Namespace, algo: str, env: str, seed: int, steps: int) -> Path:
    name = f"{algo}_s{seed}_{steps}"
    variant = [*args.overrides, *(["speed"] if args.speed else [])]
    if variant:  # experiments never share a directory with the suite's own runs
        name += "_" + hashlib.sha1(" ".join(variant).encode()).hexdigest()[:8]
    return Path(args.work) / args.suite / env.replace("/", "-") / name


def variant(args: argparse.Namespace) -> dict[str, Any]:
    """What makes runs of an experiment differ from the suite's own (one per results root)."""
    return {"set": list(args.overrides), "speed": args.speed, "timesteps": args.timesteps}


def _default_out(out: str) -> bool:
    """Whether ``out`` is the committed results root (however it is written)."""
    return Path(out).resolve() == Path(DEFAULT_OUT).resolve()


def check_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with a run request, before anything is written; ``None`` if none."""
    tasks = SUITES[args.suite]
    envs = args.envs.split(",") if args.envs else []
    algos = args.algos.split(",") if args.algos else []
    for env in envs:
        if env not in tasks:
            return f"--envs: {env!r} is not in suite {args.suite} ({', '.join(tasks)})"
    unknown = sorted(set(algos) - set(ALGOS))
    if unknown:
        return f"unknown --algos {unknown}; choose from {', '.join(ALGOS)}"
    if len(set(envs)) != len(envs) or len(set(algos)) != len(algos):
        return "--envs and --algos must not repeat a name"
    if args.workers < 1 or args.checkpoint_interval < 1:
        return "--workers and --checkpoint-interval must be >= 1"
    if args.timesteps is not None and args.timesteps < 1:
        return f"--timesteps must be >= 1, got {args.timesteps}"
    default = _default_out(args.out)
    if default and (args.overrides or args.speed or args.timesteps):
        return "--set, --speed and --timesteps runs are experiments: give them their own --out"
    if args.overrides and algos and not set(algos) & set(OURS + SB3_KFAC):
        return "--set overrides our configs: include acktr, ppo_kfac, sb3_acktr or sb3_ppo_kfac"
    marker = Path(args.out) / "variant.json"
    if not default and marker.exists() and json.loads(marker.read_text()) != variant(args):
        return f"{args.out} holds another experiment ({marker.read_text()}): choose another --out"
    for algo, env, _, _ in plan(args):  # every run's settings can be read
        if algo not in OURS:
            try:
                zoo_settings(algo, find_task(env)[1], tuple(args.overrides))
            except (KeyError, ValueError) as err:
                return f"{algo} on {env}: no settings ({err})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="classic")
    parser.add_argument("--envs", help="comma-separated; default: the suite's")
    parser.add_argument("--algos", help=f"comma-separated from {', '.join(ALGOS)}")
    parser.add_argument("--seeds", type=_seed_list, help="N (seeds 0..N-1) or FIRST-LAST")
    parser.add_argument("--timesteps", type=int, help="default: the task's budget")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (1 thread each)")
    parser.add_argument("--rerun", action="store_true", help="repeat runs already in the results")
    parser.add_argument("--list", action="store_true", help="show the plan and stop")
    parser.add_argument("--speed", action="store_true", help="SB3 runs with our n_envs x n_steps")
    parser.add_argument("--checkpoint-interval", type=int, default=100_000)
    add_override_argument(parser, "override our agents' config (repeatable; needs --out)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results root")
    parser.add_argument("--work", default="runs/benchmark", help="run directories (checkpoints)")
    parser.add_argument("--report", action="store_true", help="rewrite README.md's tables")
    parser.add_argument("--ingest", nargs="+", metavar="RUN_DIR", help="finished train.py runs")
    parser.add_argument("--commit", help="with --ingest: the commit of runs that lack one")
    parser.add_argument("--device", help="with --ingest: the device of runs that lack one")
    args = parser.parse_args()
    if (args.commit or args.device) and not args.ingest:
        parser.error("--commit and --device go with --ingest")
    if args.report:
        if not any(SuiteResults(Path(args.out), suite).rows() for suite in SUITES):
            parser.error(f"no suite results under {args.out}: the README is left as it is")
        write_readme(Path("README.md"), Path(args.out), Path("configs"))
        print(f"README.md: results and configs tables rewritten from {args.out}/")
        return 0
    if args.ingest:
        return ingest([Path(d) for d in args.ingest], Path(args.out), args.commit, args.device)
    error = check_arguments(args)
    if error:
        parser.error(error)

    results = SuiteResults(Path(args.out), args.suite)
    done = results.finished()
    todo = []
    for algo, env, seed, steps in plan(args):
        directory = run_dir(args, algo, env, seed, steps)
        status = "done" if (algo, env, seed, steps) in done else _partial(algo, directory)
        if args.list:
            print(f"{status:>16s}  {algo:12s} {env:24s} seed {seed}  {steps} steps  {directory}")
        if status != "done" or args.rerun:
            todo.append((algo, env, seed, steps, str(directory)))
    if args.list or not todo:
        print(f"{len(todo)} runs to do in suite {args.suite}")
        return 0
    if not _default_out(args.out):
        (Path(args.out) / "variant.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "variant.json").write_text(json.dumps(variant(args)))
    if args.rerun:  # a finished run's directory is kept, moved aside: the run starts afresh
        for *_, where in todo:
            if Path(where).exists():
                Path(where).rename(aside(Path(where), "rerun"))
    overrides = tuple(args.overrides)
    specs = [
        RunSpec(a, find_task(e)[1], s, n, Path(d), overrides, args.checkpoint_interval, args.speed)
        for a, e, s, n, d in todo
    ]
    failed = 0
    finished: list[dict[str, Any]] = []
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(
        args.workers, mp_context=context, initializer=exit_with_parent
    ) as pool:
        futures = {pool.submit(_safe_job, spec): spec for spec in specs}
        for future in as_completed(futures):  # recorded as each finishes, in any order
            spec = futures[future]
            algo, env, seed, steps = spec.algo, spec.task.env, spec.seed, spec.timesteps
            try:
                outcome = future.result()
            except BrokenProcessPool:  # a worker was killed: what finished is recorded
                print(f"a worker died during {algo} {env} seed {seed}; run again to go on",
                      file=sys.stderr)  # fmt: skip
                return 1
            if isinstance(outcome, str):
                failed += 1
                print(f"FAILED {algo} {env} seed {seed}:\n{outcome}", file=sys.stderr)
                continue
            row = record(results, (algo, env, seed, steps), spec.run_dir, outcome)
            finished.append(row)
            print(
                f"done {algo} {env} seed {seed}: first to {spec.task.threshold:g} "
                f"{row['first_to_threshold']}, final last-100 {row['final_last100']}, "
                f"{row['wall_s']} s",
                flush=True,
            )
    summarize(finished)
    print(f"results: {results.runs_path}, {results.episodes_path}")
    return 1 if failed else 0


def record(
    results: SuiteResults, key: tuple[str, str, int, int], directory: Path, summary: dict[str, Any]
) -> dict[str, Any]:
    """Add the finished run in ``directory`` to ``results`` and redraw its env's curves."""
    _, task = find_task(key[1])
    eps = episodes(directory)
    row = run_row(key, eps, task.threshold, summary)
    results.add(row, eps)
    results.plot(key[1], task.threshold)
    return row


def _safe_job(spec: RunSpec) -> dict[str, Any] | str:
    """The run's summary, or its traceback (one failed run does not stop the others)."""
    try:
        return run(spec)
    except RunInProgress as err:
        return str(err)
    except Exception:
        return traceback.format_exc()


def _partial(algo: str, directory: Path) -> str:
    checkpoint = directory / ("last.pt" if algo in OURS else "progress.json")
    if (directory / "result.json").exists():
        return "finished, not in results"
    if not checkpoint.exists():
        return "to do"
    if algo in OURS:
        return "partial"
    return f"partial {json.loads(checkpoint.read_text())['timesteps']}"


def summarize(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["env"], row["algo"]), []).append(row)
    for (env, algo), mine in groups.items():
        firsts = [r["first_to_threshold"] or float("inf") for r in mine]
        med = statistics.median(firsts)
        finals = statistics.median(r["final_last100"] or float("nan") for r in mine)
        reached = sum(f != float("inf") for f in firsts)
        first = "never" if med == float("inf") else f"{med / 1000:.1f}k"
        print(
            f"{env} {algo}: {reached} of {len(mine)} reached, median first {first}, "
            f"final last-100 median {finals:.1f}, seeds {[r['seed'] for r in mine]}"
        )


def ingest(run_dirs: list[Path], root: Path, commit: str | None, device: str | None) -> int:
    """Add finished ``scripts/train.py`` runs (long ones resumed over several sittings with
    ``--resume``) to their suite; ``commit``/``device`` name them for runs made before
    ``result.json`` recorded them."""
    import yaml

    loaded = []
    for directory in run_dirs:  # all checked before any is added
        try:
            summary = json.loads((directory / "result.json").read_text())
            cfg = yaml.safe_load((directory / "config.yaml").read_text())
            find_task(cfg["env_id"])
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {directory}: {err}", file=sys.stderr)
            return 2
        if summary["timesteps"] < cfg["total_timesteps"]:
            steps = summary["timesteps"]
            print(f"error: {directory} is not finished: {steps} steps", file=sys.stderr)
            return 2
        loaded.append((directory, summary, cfg))
    for directory, summary, cfg in loaded:
        suite, _ = find_task(cfg["env_id"])
        summary["commit"] = commit or summary.get("commit", "unknown")
        summary["device"] = device or summary.get("device", "unknown")
        key = (cfg["algo"], cfg["env_id"], int(cfg["seed"]), int(cfg["total_timesteps"]))
        row = record(SuiteResults(root, suite), key, directory, summary)
        print(f"{directory}: {suite}: {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
