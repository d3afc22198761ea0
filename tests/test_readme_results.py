"""README results table == `scripts/benchmark.py --report` of the committed CSVs."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts/benchmark.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_matches_committed_results():
    bench = load_benchmark()
    readme = (ROOT / "README.md").read_text()
    assert bench.readme_block(readme) == bench.render_report(ROOT / "bench_results"), (
        "README results differ from bench_results/: run `python scripts/benchmark.py --report`"
    )


def test_report_rows_count_and_median_by_hand(tmp_path):
    bench = load_benchmark()
    rows = [  # LunarLander: seeds 0-4 are its tuning seeds, 5-6 held out
        ("acktr", 0, "100000", 250.0),
        ("acktr", 1, "", 120.0),
        ("acktr", 2, "300000", 230.0),
        ("acktr", 3, "", 150.0),
        ("acktr", 4, "", 110.0),
        ("acktr", 5, "200000", 240.0),
        ("acktr", 6, "400000", 210.0),
    ]
    out = tmp_path / "LunarLander-v3" / "acktr"
    out.mkdir(parents=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "algo",
                "env",
                "seed",
                "timesteps",
                "first_to_threshold",
                "final_last100",
                "wall_s",
                "commit",
            ]
        )
        for algo, seed, first, final in rows:
            writer.writerow([algo, "LunarLander-v3", seed, 500000, first, final, 50.0, "abc1234"])
    table = bench.render_report(tmp_path).splitlines()
    assert len(table) == 4
    # tuning seeds: 2 of 5 reached; median of (100k, inf, 300k, inf, inf) is inf -> never
    assert "| 0-4 (tuning) | 2 of 5 | never | 100.0k, never, 300.0k, never, never |" in table[2]
    assert "| 150; 250, 120, 230, 150, 110 |" in table[2]
    # held out: median of 200k and 400k
    assert "| 5-6 (held out) | 2 of 2 | 300.0k | 200.0k, 400.0k | 225; 240, 210 |" in table[3]
    assert table[3].endswith("| 50 s | abc1234 |")


def test_a_finished_training_run_is_ingested_with_its_episodes_and_commit(tmp_path):
    import json

    from agents.cli import train_main
    from agents.episode_log import read_episodes

    def torch_device_name() -> str:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"

    bench = load_benchmark()
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/acktr/cartpole.yaml"), "--log-dir", str(run)]
    assert train_main([*args, "--total-timesteps", "1600", "--no-progress"]) == 0
    summary = json.loads((run / "result.json").read_text())
    assert summary["wall_time_total_s"] >= summary["wall_time_s"] > 0
    bench.ingest([run], tmp_path / "results", None)
    out = tmp_path / "results" / "CartPole-v1" / "acktr"
    with open(out / "runs.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["seed"], row["timesteps"], row["commit"]) == ("0", "1600", summary["commit"])
    assert row["device"] == summary["device"] in ("cpu", f"cuda: {torch_device_name()}")
    with open(out / "episodes.csv", newline="") as f:
        logged = list(csv.reader(f))[1:]
    assert [int(s) for _, _, s, _ in logged] == [
        s for s, _, _ in read_episodes(run / "episodes.csv")
    ]
    assert (out / "curves.png").exists()


def test_wall_times_are_given_per_device_when_runs_used_different_hardware():
    bench = load_benchmark()
    runs = [
        {"wall_s": "4900", "device": "cpu"},
        {"wall_s": "400", "device": "cuda: NVIDIA H200"},
        {"wall_s": "100"},  # recorded before devices were: this project's CPU machine
    ]
    assert bench._walls(runs[2:]) == "100 s"
    assert bench._walls(runs) == "2500 s (cpu); 400 s (cuda: NVIDIA H200)"


def test_the_lowest_last100_after_the_threshold_is_found_by_hand():
    bench = load_benchmark()
    # 100 episodes of 500 (mean 500 at the 100th), then 50 of 0: the mean falls to 250
    episodes = [(i, 500.0) for i in range(100)] + [(100 + i, 0.0) for i in range(50)]
    assert bench.low_after_threshold(episodes, 475.0) == 250.0
    assert bench.low_after_threshold(episodes[:99], 475.0) is None  # never 100 episodes
    assert bench.low_after_threshold([(i, 400.0) for i in range(200)], 475.0) is None
