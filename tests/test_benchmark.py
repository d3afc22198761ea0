"""The benchmark runner: suites, results files, resume, and the README tables it generates."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from agents.bench import defaults, report
from agents.bench.results import SuiteResults, first_to_threshold, low_after_threshold, run_row
from agents.bench.runs import RunInProgress, RunSpec, claimed, run, zoo_settings
from agents.bench.suites import ALGOS, OURS, REFERENCE, SUITES, TUNED_ON, find_task

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_the_committed_results_and_configs():
    readme = (ROOT / "README.md").read_text()
    assert report.block(readme, report.RESULTS) == report.render_results(ROOT / "bench_results"), (
        "README results differ from bench_results/: run `python scripts/benchmark.py --report`"
    )
    assert report.block(readme, report.CONFIGS) == report.render_configs(ROOT / "configs")
    experiments = report.render_experiments(ROOT / "bench_results" / "experiments")
    assert report.block(readme, report.EXPERIMENTS) == experiments
    assert report.block(readme, report.SPEED) == report.render_speed(ROOT / "bench_results/speed")
    shown = report.block(readme, defaults.MARKERS)
    assert shown == defaults.render(defaults.read(ROOT / defaults.RESULTS)), (
        "README's SB3-defaults table differs: run `python scripts/bench_sb3_defaults.py --report`"
    )


def test_sb3_defaults_metrics_by_hand():
    evals = [(5000, 300.0), (10000, 480.0), (15000, 390.0), (20000, 500.0)]
    assert defaults.metrics(evals, 475) == {
        "first_reach": 10000,
        "lowest_after": 390.0,
        "final_eval": 500.0,
    }
    assert defaults.metrics(evals[:1], 475) == {
        "first_reach": None,
        "lowest_after": None,
        "final_eval": 300.0,
    }
    rows = [
        {"algo": "acktr", "env": "CartPole-v1", "seed": str(s), "threads": "1",
         "first_reach": f, "lowest_after": low, "final_eval": fin,
         "kfac_steps": "100", "rejected_steps": rej}
        for s, f, low, fin, rej in [
            (0, "10000", "480.0", "500.0", "1"),
            (1, "30000", "390.0", "480.0", "3"),
            (2, "", "", "200.0", "0"),
        ]
    ]  # fmt: skip
    (line,) = defaults.render(rows).splitlines()[2:]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:9] == ["0-4 (tuning)", "2 of 3", "20k", "2 of 3", "390", "1.3%"]
    assert cells[9] == (
        "`python scripts/bench_sb3_defaults.py --envs CartPole-v1 --algos acktr --seeds 0-4 "
        "--threads 1 --out /tmp/rerun.csv`"
    )


def test_every_shipped_config_states_whether_it_was_tuned():
    shipped = {f"{p.parent.name}/{p.stem}" for p in (ROOT / "configs").glob("*/*.yaml")}
    assert shipped == set(TUNED_ON)


def test_every_planned_run_has_its_config_and_rl_zoo_entry():
    for tasks in SUITES.values():
        for env, task in tasks.items():
            assert find_task(env)[1] is task
            for algo in task.plan:
                assert algo in ALGOS
                if algo in REFERENCE:
                    assert zoo_settings(algo, task)  # rl-zoo has the key
                else:
                    config = yaml.safe_load((ROOT / task.config_path(algo)).read_text())
                    assert config["env_id"] == env
    atari = SUITES["atari"]  # the Atari plan
    assert {a: list(s) for a, s in atari["ALE/Pong-v5"].plan.items()} == {
        "acktr": [0, 1],
        "ppo_kfac": [0],
        "a2c": [0],
    }
    with pytest.raises(ValueError, match="no suite has 'Foo-v0'"):
        find_task("Foo-v0")


def test_metrics_by_hand():
    # 100 episodes of 500 (mean 500 at the 100th), then 50 of 0: the mean falls to 250
    episodes = [(10 * i, 500.0) for i in range(100)] + [(1000 + i, 0.0) for i in range(50)]
    assert first_to_threshold(episodes, 475.0) == 990  # the 100th episode's step
    assert low_after_threshold(episodes, 475.0) == 250.0
    assert low_after_threshold(episodes[:99], 475.0) is None  # never 100 episodes
    ramp = [(i, float(i)) for i in range(300)]  # last-100 mean after episode k: k - 49.5
    assert first_to_threshold(ramp, 150.0) == 200
    row = run_row(("acktr", "X-v0", 3, 300), ramp, 150.0, {"wall_time_total_s": 9.0})
    assert (row["final_last100"], row["best_last100"], row["episodes"]) == (249.5, 249.5, 300)
    assert row["low_after_threshold"] == 150.5


def _write_runs(path: Path, rows: list[tuple[str, int, str, float]], env: str, steps: int) -> None:
    results = SuiteResults(path, "classic")
    for algo, seed, first, final in rows:
        row = {
            "algo": algo,
            "env": env,
            "seed": seed,
            "timesteps": steps,
            "first_to_threshold": first,
            "final_last100": final,
            "wall_s": 50.0,
            "commit": "abc1234",
        }
        results.add(row, [(1, final)])


def test_report_rows_count_and_median_by_hand(tmp_path):
    rows = [  # LunarLander: seeds 0-4 are its tuning seeds, 5-6 held out
        ("acktr", 0, "100000", 250.0),
        ("acktr", 1, "", 120.0),
        ("acktr", 2, "300000", 230.0),
        ("acktr", 3, "", 150.0),
        ("acktr", 4, "", 110.0),
        ("acktr", 5, "200000", 240.0),
        ("acktr", 6, "400000", 210.0),
    ]
    _write_runs(tmp_path, rows, "LunarLander-v3", 500_000)
    table = report.render_results(tmp_path).splitlines()
    assert table[0] == "**classic** (`bench_results/classic/`)"
    body = [line for line in table if line.startswith("| LunarLander")]
    assert len(body) == 2
    # tuning seeds: 2 of 5 reached; median of (100k, inf, 300k, inf, inf) is inf -> never
    assert "| 0-4 (tuning) | 2 of 5 | never | 100.0k, never, 300.0k, never, never |" in body[0]
    assert "| 150; 250, 120, 230, 150, 110 |" in body[0]
    # held out: median of 200k and 400k
    assert "| 5-6 (held out) | 2 of 2 | 300.0k | 200.0k, 400.0k | 225; 240, 210 |" in body[1]
    assert "| 50 s | abc1234 |" in body[1]
    assert body[1].endswith(  # the row's own command: those seeds, into a fresh directory
        "| `python scripts/benchmark.py --suite classic --envs LunarLander-v3 --algos acktr "
        "--seeds 5-6 --out /tmp/rerun --work /tmp/rerun` |"
    )


def test_goals_are_judged_on_the_median_of_seeds_0_to_4(tmp_path):
    results = SuiteResults(tmp_path, "mujoco")
    for seed, final in enumerate([6000.0, 5000.0, 5900.0, 5800.0, 6100.0, 1.0]):
        row = {"algo": "ppo_kfac", "env": "HalfCheetah-v5", "seed": seed,
               "timesteps": 1_000_000, "first_to_threshold": "", "final_last100": final,
               "wall_s": 1.0, "commit": "c"}  # fmt: skip
        results.add(row, [])
    text = report.render_results(tmp_path)
    # seeds 0-4: median 5900 >= 5819; seed 5 is not counted
    assert "| HalfCheetah-v5 | PPO-KFAC (rl-kfac) | 5819 | 5900 | met |" in text
    assert "| HalfCheetah-v5 | ACKTR (rl-kfac) | 3041 |  | no runs yet |" in text


def test_wall_times_are_given_per_device_when_runs_used_different_hardware():
    runs = [
        {"wall_s": "4900", "device": "cpu"},
        {"wall_s": "400", "device": "cuda: NVIDIA H200"},
        {"wall_s": "100"},  # recorded before devices were: this project's CPU machine
    ]
    assert report._walls(runs[2:]) == "100 s"
    assert report._walls(runs) == "2500 s (cpu); 400 s (cuda: NVIDIA H200)"


def test_a_run_is_appended_and_a_rerun_replaces_it(tmp_path):
    results = SuiteResults(tmp_path, "classic")
    row = {"algo": "acktr", "env": "CartPole-v1", "seed": 0, "timesteps": 100,
           "final_last100": 1.0, "wall_s": 1.0, "commit": "a"}  # fmt: skip
    results.add(row, [(10, 1.0), (20, 2.0)])
    results.add({**row, "seed": 1}, [(5, 3.0)])
    assert results.finished() == {
        ("acktr", "CartPole-v1", 0, 100),
        ("acktr", "CartPole-v1", 1, 100),
    }
    results.add({**row, "commit": "b"}, [(30, 4.0)])  # seed 0 again
    assert [(r["seed"], r["commit"]) for r in results.rows()] == [("1", "a"), ("0", "b")]
    assert results.episodes() == [
        ("acktr", "CartPole-v1", 1, 5, 3.0),
        ("acktr", "CartPole-v1", 0, 30, 4.0),
    ]
    assert results.plot("CartPole-v1", 475.0).exists()


def test_a_row_waits_while_another_command_holds_the_suite(tmp_path):
    """Two benchmark commands on one suite: one's rewrite (a rerun) must not interleave with the
    other's append. While the lock is held elsewhere, ``add`` writes nothing."""
    holder, writer = SuiteResults(tmp_path, "classic"), SuiteResults(tmp_path, "classic")
    row = {"algo": "acktr", "env": "CartPole-v1", "seed": 0, "timesteps": 100, "commit": "a"}
    with holder.locked():
        thread = threading.Thread(target=writer.add, args=(row, [(10, 1.0)]))
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive() and writer.rows() == []
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert [r["seed"] for r in writer.rows()] == ["0"]


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: runs are not claimed")
def test_a_run_another_process_is_training_is_refused_untouched(tmp_path):
    """Two processes on one run directory would overwrite each other's checkpoints: while one
    holds the claim, ``run`` refuses with the holder's pid and writes nothing."""
    _, task = find_task("CartPole-v1")
    directory = tmp_path / "run"
    with claimed(directory):  # flock: a second open of the file conflicts, even in one process
        with pytest.raises(RunInProgress, match=f"pid {os.getpid()}"):
            run(RunSpec("acktr", task, 0, 640, directory, checkpoint_interval=640))
        assert not directory.exists()
    assert run(RunSpec("acktr", task, 0, 640, directory, checkpoint_interval=640))["timesteps"]


_ORPHAN = """
import multiprocessing as mp, os, sys, time
from agents.bench.runs import exit_with_parent

def child(path):
    exit_with_parent(poll_s=0.1)
    open(path, "w").write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    mp.get_context("spawn").Process(target=child, args=(sys.argv[1],)).start()
    time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_worker_ends_when_the_command_that_started_it_is_killed(tmp_path):
    """``kill PID`` of a benchmark command reaches it alone; its workers must not train on."""
    script, pid_file = tmp_path / "parent.py", tmp_path / "child.pid"
    script.write_text(_ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # an exited child not yet reaped by init is a zombie
        return f.read().split(")")[-1].split()[0] != "Z"


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.mark.parametrize("algo", ["acktr", "a2c"])
def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path, algo):
    """A run asked for more steps than its directory holds goes on from the last checkpoint;
    a directory without one is moved aside, not written over."""
    _, task = find_task("CartPole-v1")
    directory = tmp_path / "run"
    first = run(RunSpec(algo, task, 0, 1280, directory, checkpoint_interval=640))
    assert first["timesteps"] == 1280
    before = _rows(directory / "episodes.csv")
    second = run(RunSpec(algo, task, 0, 2560, directory, checkpoint_interval=640))
    assert second["timesteps"] == 2560
    assert second["wall_time_total_s"] > first["wall_time_total_s"]
    after = _rows(directory / "episodes.csv")
    assert after[: len(before)] == before  # the first part's episodes are kept, once
    steps = [int(s) for s, _, _ in after]
    assert steps == sorted(steps) and steps[-1] <= 2560 and steps[-1] > 1280
    if algo not in OURS:  # one checkpoint's files at a time
        progress = json.loads((directory / "progress.json").read_text())
        assert progress["timesteps"] == 2560
        assert sorted(p.name for p in directory.glob("model_*.zip")) == [progress["model"]]

    if algo in OURS:  # stopped after its last checkpoint, before writing result.json
        (directory / "result.json").unlink()
        again = run(RunSpec(algo, task, 0, 2560, directory, checkpoint_interval=640))
        assert again["timesteps"] == 2560 and again["commit"] == second["commit"]

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "notes.txt").write_text("mine")
    run(RunSpec(algo, task, 0, 640, stale, checkpoint_interval=640))
    assert (tmp_path / "stale.interrupted-1" / "notes.txt").read_text() == "mine"
    assert (stale / "result.json").exists()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmark.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_the_cli_refuses_bad_input_with_exit_2_before_writing(tmp_path):
    out = tmp_path / "out"
    bad = [
        (["--suite", "classic", "--envs", "Hopper-v5"], "not in suite classic"),
        (["--suite", "classic", "--algos", "sac"], "unknown --algos"),
        (["--suite", "classic", "--set", "lr=0.1"], "give them their own --out"),
        (["--suite", "nope"], "invalid choice"),
        (["--suite", "classic", "--timesteps", "100"], "give them their own --out"),
        (["--suite", "classic", "--workers", "0"], "must be >= 1"),
        (["--suite", "classic", "--algos", "acktr,acktr"], "must not repeat"),
        (["--suite", "recurrent", "--algos", "ppo", "--seeds", "1"], "ppo on CartPoleNoVel-v1"),
        (["--commit", "abc"], "go with --ingest"),
        (["--report", "--out", str(out)], "no suite results"),
    ]
    for args, message in bad:
        done = _cli(*args, "--work", str(tmp_path / "work"))
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists() and not (tmp_path / "work").exists()
    readme = (ROOT / "README.md").read_text()
    assert report.block(readme, report.RESULTS)  # the failed --report left the README alone


def test_an_experiment_root_holds_one_variant(tmp_path):
    where = ["--out", str(tmp_path / "exp"), "--work", str(tmp_path / "work")]
    args = ["--suite", "classic", "--envs", "CartPole-v1", "--algos", "acktr", "--seeds", "1"]
    first = _cli(*args, "--timesteps", "320", "--set", "lr=0.1", "--workers", "1", *where)
    assert first.returncode == 0, first.stderr
    other = _cli(*args, "--timesteps", "320", "--set", "lr=0.2", *where)
    assert other.returncode == 2 and "holds another experiment" in other.stderr


def test_the_plan_lists_done_partial_and_missing_runs(tmp_path):
    _write_runs(tmp_path, [("acktr", 0, "", 1.0)], "CartPole-v1", 100_000)
    where = ["--out", str(tmp_path), "--work", str(tmp_path / "w")]
    done = _cli("--suite", "classic", "--envs", "CartPole-v1", "--algos", "acktr,a2c",
                "--seeds", "2", "--list", *where)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["done", "acktr", "CartPole-v1"]
    assert [line.split()[0] for line in lines[1:4]] == ["to", "to", "to"]
    assert lines[-1] == "3 runs to do in suite classic"


def test_a_suite_run_is_recorded_and_not_repeated(tmp_path):
    where = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    args = ["--suite", "classic", "--envs", "CartPole-v1", "--algos", "acktr", "--seeds", "1"]
    done = _cli(*args, "--timesteps", "640", "--workers", "1", *where)
    assert done.returncode == 0, done.stderr
    rows = SuiteResults(tmp_path / "out", "classic").rows()
    assert [(r["algo"], r["seed"], r["timesteps"]) for r in rows] == [("acktr", "0", "640")]
    assert (tmp_path / "out" / "classic" / "CartPole-v1.png").exists()
    again = _cli(*args, "--timesteps", "640", *where)
    assert again.returncode == 0 and "0 runs to do" in again.stdout
    rerun = _cli(*args, "--timesteps", "640", "--rerun", "--workers", "1", *where)
    assert rerun.returncode == 0, rerun.stderr
    old = tmp_path / "work" / "classic" / "CartPole-v1" / "acktr_s0_640.rerun-1"
    assert (old / "result.json").exists()  # the first run's directory, kept
    assert len(SuiteResults(tmp_path / "out", "classic").rows()) == 1


def test_an_experiment_is_reported_next_to_the_shipped_rows(tmp_path):
    _write_runs(
        tmp_path, [("ppo_kfac", s, "60000", 500.0) for s in range(3)], "CartPole-v1", 100_000
    )
    exp = tmp_path / "experiments" / "no_damping"
    (exp).mkdir(parents=True)
    (exp / "variant.json").write_text(
        json.dumps({"set": ["damping_adaptation=none"], "speed": False, "timesteps": None})
    )
    _write_runs(exp, [("ppo_kfac", s, "", 300.0) for s in range(3)], "CartPole-v1", 100_000)
    text = report.render_experiments(tmp_path / "experiments").splitlines()
    assert text[0] == "**no_damping**: damping_adaptation=none (`classic` suite)"
    rows = [line for line in text if line.startswith("| CartPole")]
    assert "PPO-KFAC (rl-kfac): no_damping | 0-2 (tuning) | 0 of 3 |" in rows[0]
    assert "PPO-KFAC (rl-kfac): shipped | 0-2 (tuning) | 3 of 3 |" in rows[1]


@pytest.mark.parametrize("algo", ["ppo_kfac", "acktr"])
def test_train_py_reproduces_the_benchmarks_run_episode_for_episode(tmp_path, algo):
    """``scripts/train.py --config C --seed S --threads 1`` and the benchmark's run of the same
    config and seed write the same ``episodes.csv``, whatever thread count the process started
    with (torch's default is every core: 2 on this project's machine)."""
    import torch

    from agents.cli import train_main

    task = find_task("CartPole-v1")[1]
    steps = 4000 if algo == "ppo_kfac" else 20_000  # where the two departed before (row 36, 153)
    started = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        argv = ["--config", task.config_path(algo), "--seed", "0", "--threads", "1"]
        argv += ["--total-timesteps", str(steps), "--log-dir", str(tmp_path / "train")]
        assert train_main([*argv, "--no-progress"]) == 0
        run(RunSpec(algo, task, 0, steps, tmp_path / "bench"))
    finally:
        torch.set_num_threads(started)
    ours = (tmp_path / "train" / "episodes.csv").read_bytes()
    assert ours == (tmp_path / "bench" / "episodes.csv").read_bytes()
    assert len(ours.splitlines()) > 40
