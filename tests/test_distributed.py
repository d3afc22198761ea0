"""Data-parallel K-FAC over torch.distributed (gloo, 2 CPU processes)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from agents.checkpoint import load_checkpoint
from rl_kfac import KFAC
from rl_kfac.distributed import (
    Communicator,
    DistributedError,
    TorchCommunicator,
    allreduce_gradients,
    assign_owners,
    average,
    exit_after_failure,
    shutdown,
)

WORLD = 2
STEPS = 4
N = 12  # samples per rank


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 6),
        nn.ReLU(),
        nn.Linear(6, 4),
    )


def data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(WORLD * N, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (WORLD * N,), generator=g),  # "sampled" Fisher targets, fixed
            torch.randint(0, 4, (WORLD * N,), generator=g),  # labels of the training loss
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, batches, comm: Communicator | None, part: slice) -> KFAC:
    opt = KFAC(
        model,
        lr=0.3,
        momentum=0.9,
        kl_clip=1e-2,
        damping=1e-2,
        stat_decay=0.9,
        inverse_update_interval=2,
        factor_dtype=torch.float64,
        communicator=comm,
    )
    for x, targets, labels in batches:
        out = model(x[part])
        opt.fisher_backward(F.cross_entropy(out, targets[part]))
        opt.zero_grad()
        F.cross_entropy(out, labels[part]).backward()
        allreduce_gradients(model.parameters(), comm)
        opt.step()
    return opt


def init(rank: int, init_file: str, seconds: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=seconds),
    )


def equivalence_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_default_dtype(torch.float64)
    init(rank, init_file, 60)
    model = make_model()
    opt = train(model, data(), TorchCommunicator(), slice(rank * N, (rank + 1) * N))
    factors = {k: v for k, v in enumerate(opt.state_dict()["state"].values())}
    torch.save({"params": list(model.parameters()), "state": factors}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def run_workers(target, *args) -> list[int | None]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:  # never leave a hung worker behind
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    init_file = str(tmp_path / "init")
    assert run_workers(equivalence_worker, init_file, str(tmp_path)) == [0, 0]
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]

    torch.set_default_dtype(torch.float64)
    try:
        model = make_model()
        opt = train(model, data(), None, slice(None))
    finally:
        torch.set_default_dtype(torch.float32)
    for rank in ranks:
        for p, q in zip(model.parameters(), rank["params"]):
            torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-6)
    # factors and eigenbases are identical on every rank (bit for bit) and match one process
    reference = list(opt.state_dict()["state"].values())
    for key, state in ranks[0]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ranks[1]["state"][key][name]), (key, name)
            if name in ("A", "G"):
                torch.testing.assert_close(value, reference[key][name], rtol=1e-10, atol=1e-12)


def failing_worker(rank: int, init_file: str, out: str, mode: str) -> None:
    init(rank, init_file, 2)
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails before the collective")
        time.sleep(8)  # stalls past the others' 2 s timeout
        # rank 0 must have given up while this rank was still stalled (ordering, not timing)
        (Path(out) / "rank1.txt").write_text(str((Path(out) / "error.txt").exists()))
        return
    try:
        average([torch.ones(3)], TorchCommunicator())
    except DistributedError:
        (Path(out) / "error.txt").write_text(traceback.format_exc())
        exit_after_failure(4)  # as the training CLI does


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failed_rank_stops_the_others_with_a_clear_error(tmp_path, mode):
    codes = run_workers(failing_worker, str(tmp_path / "init"), str(tmp_path), mode)
    assert codes == [4, 1 if mode == "raise" else 0]  # rank 0 did not hang
    message = (tmp_path / "error.txt").read_text()
    assert "rank 0/2: all_reduce failed; another rank probably exited" in message
    if mode == "stall":  # rank 0 failed at its timeout, while rank 1 was still stalled
        assert (tmp_path / "rank1.txt").read_text() == "True"


class _InFlight:
    def __init__(self, tensors):
        self.tensors = [t.clone() for t in tensors]

    def wait(self):
        return self.tensors


class MirrorCommunicator:
    """Rank 0 of two identical ranks: averages are the inputs, returned only by ``wait()``."""

    rank, world_size, device = 0, 2, torch.device("cpu")

    def average_async(self, tensors):
        return _InFlight(tensors)

    def broadcast(self, tensors, src):
        assert src == self.rank, "a mirror has no other rank to receive from"


def test_a_copy_holds_the_statistics_of_an_average_in_flight():
    """deepcopy/pickle fold in the factors whose cross-rank average is still pending."""
    comm: Communicator = MirrorCommunicator()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, communicator=comm)
    x = torch.randn(16, 3)
    with opt.record_statistics():
        F.cross_entropy(model(x), torch.randint(0, 2, (16,))).backward()
    copy = pickle.loads(pickle.dumps(opt))
    first = model[0].weight
    a = torch.cat([x, torch.ones(16, 1)], 1)
    torch.testing.assert_close(opt.state[first]["A"], a.T @ a / 16)
    (copied,) = [
        s for s in copy.state.values() if s.get("A") is not None and s["A"].shape == (4, 4)
    ]
    torch.testing.assert_close(copied["A"], opt.state[first]["A"], rtol=0, atol=0)
    assert copy.counters["statistics_updates"] == opt.counters["statistics_updates"] == 1


def test_assignment_balances_factor_sizes():
    # largest first to the least-loaded rank: 1000→0, 512→1, 500→1, 27→0, 8→1, 1→1
    assert assign_owners([1000.0, 8.0, 512.0, 500.0, 27.0, 1.0], 2) == [0, 1, 1, 1, 0, 1]
    assert assign_owners([5.0, 4.0, 3.0], 3) == [0, 1, 2]


def test_communicator_needs_an_initialised_group():
    with pytest.raises(ValueError, match="not initialised"):
        TorchCommunicator()


# -- the training script on N ranks ------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_environment(rank: int, port: int) -> None:
    """What torchrun sets for a rank, and one torch thread."""
    os.environ.update(
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _save_rank(trainer, path: Path) -> None:
    """A rank's parameters, optimizer state and steps, then leave the process group.

    ``in_flight``: whether the run left a factor all-reduce pending on this rank (read before
    ``state_dict``, which waits for it); leaving the group so can abort the process at exit.
    """
    in_flight = trainer.algo.optimizer._factors._pending is not None
    state = trainer.algo.optimizer.state_dict()["state"]
    params = list(trainer.policy.parameters())
    result = {"params": params, "state": state, "steps": trainer.timesteps, "in_flight": in_flight}
    torch.save(result, path)
    shutdown()


def trainer_worker(rank: int, port: int, out: str, resume: bool) -> None:
    _rank_environment(rank, port)
    from agents.config import load_config
    from agents.trainer import Trainer, trainer_from_checkpoint

    run = Path(out) / "run"
    if resume:
        trainer = trainer_from_checkpoint(run / "last.pt", {"total_timesteps": 4800})
    else:
        overrides = ["total_timesteps=3200", "n_envs=4", "log_interval=1", "normalize_obs=true"]
        trainer = Trainer(load_config(ROOT / "configs/acktr/cartpole.yaml", overrides), run)
    trainer.train()
    _save_rank(trainer, Path(out) / f"{rank}.pt")


def recurrent_worker(rank: int, port: int, out: str) -> None:
    """Two ranks training recurrent PPO-KFAC: sequences, states and the LSTM's statistics."""
    _rank_environment(rank, port)
    from agents.config import load_config
    from agents.trainer import Trainer

    overrides = ["total_timesteps=1024", "n_envs=4", "n_steps=16", "batch_size=32"]
    cfg = load_config(ROOT / "configs/ppo_kfac/cartpole_novel.yaml", overrides)
    trainer = Trainer(cfg, Path(out) / "run")
    trainer.train()
    _save_rank(trainer, Path(out) / f"{rank}.pt")


def rank_results(out: Path) -> list[dict]:
    return [torch.load(out / f"{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_ranks_identical(results: list[dict]) -> None:
    for p, q in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p, q)
    for key, state in results[0]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, results[1]["state"][key][name]), (key, name)


def test_training_on_two_ranks_keeps_them_identical_and_resumes(tmp_path):
    assert run_workers(trainer_worker, free_port(), str(tmp_path), False) == [0, 0]
    results = rank_results(tmp_path)
    assert [r["steps"] for r in results] == [3200, 3200]  # 4 envs x 20 steps x 2 ranks / update
    assert [r["in_flight"] for r in results] == [False, False]
    assert_ranks_identical(results)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())  # rank 0 alone writes
    assert files[:2] == ["config.yaml", "episodes.csv"]
    assert files[3:] == ["last.pt", "result.json"]
    assert files[2].startswith("events.out.tfevents")
    ckpt = load_checkpoint(tmp_path / "run/last.pt")
    assert ckpt["timesteps"] == 3200 and ckpt["updates"] == 20
    for p, q in zip(ckpt["policy"].values(), results[0]["params"]):
        assert torch.equal(p, q)

    assert run_workers(trainer_worker, free_port(), str(tmp_path), True) == [0, 0]
    resumed = rank_results(tmp_path)
    assert [r["steps"] for r in resumed] == [4800, 4800]
    assert_ranks_identical(resumed)
    assert load_checkpoint(tmp_path / "run/last.pt")["updates"] == 30


def test_recurrent_training_on_two_ranks_keeps_them_identical(tmp_path):
    assert run_workers(recurrent_worker, free_port(), str(tmp_path)) == [0, 0]
    results = rank_results(tmp_path)
    assert [r["steps"] for r in results] == [1024, 1024]
    assert [r["in_flight"] for r in results] == [False, False]
    assert_ranks_identical(results)
    assert any("A" in state for state in results[0]["state"].values())


def test_torchrun_runs_the_training_script(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "scripts/train.py"),
        "--config",
        str(ROOT / "configs/ppo_kfac/cartpole.yaml"),
        "--set",
        "total_timesteps=1600",
        "--log-dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # all of it: each rank's error is in there
    assert done.stdout.count("run directory:") == 1  # printed by rank 0 only
    assert "done: 1600 steps" in done.stdout and "rank 0 of 2" in done.stdout
