"""Faults and bad input: one line and exit 2 before anything is written, nothing that exists is
lost, no parameter ever becomes non-finite, and a stopped run resumes to the same step counts."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents import checkpoint as ckpt
from agents.cli import evaluate_main, train_main
from agents.config import load_config
from agents.episode_log import read_episodes
from agents.trainer import Trainer
from rl_kfac import KFAC

CARTPOLE = "configs/acktr/cartpole.yaml"
SMALL = ["--set", "n_envs=2", "--set", "n_steps=8", "--no-progress"]


def digest(path: Path) -> dict[str, str]:
    """Name → SHA-256 of every file under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def train(run: Path, steps: int, *extra: str) -> int:
    args = ["--config", CARTPOLE, "--log-dir", str(run), "--total-timesteps", str(steps)]
    return train_main([*args, *SMALL, *extra])


@pytest.fixture
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "a"
    assert train(run, 160) == 0
    return run


def one_line_error(capsys, code: int, text: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert text in err and "\n" not in err, err


# -- nothing that exists is overwritten ------------------------------------------------------------
def test_resuming_into_another_runs_directory_is_refused(finished_run, tmp_path, capsys):
    other = tmp_path / "b"
    assert train(other, 320) == 0
    before = digest(other)
    code = train_main(["--resume", str(finished_run / "last.pt"), "--log-dir", str(other)])
    one_line_error(capsys, code, "is not the directory of")
    assert digest(other) == before


def test_resume_with_config_or_without_steps_left_is_refused(finished_run, capsys):
    before = digest(finished_run)
    last = str(finished_run / "last.pt")
    code = train_main(["--resume", last, "--config", "configs/acktr/lunarlander.yaml"])
    one_line_error(capsys, code, "--config cannot be combined with --resume")
    one_line_error(capsys, train_main(["--resume", last]), "nothing to train")
    code = train_main(["--resume", last, "--total-timesteps", "80"])
    one_line_error(capsys, code, "is not above the checkpoint's 160 steps")
    assert digest(finished_run) == before


def test_log_dir_naming_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    one_line_error(capsys, train(path, 160), "is a file")
    assert path.read_text() == "mine"


class TextObservationToy(gym.Env):
    """An observation part no policy here takes (a Text space inside a Dict)."""

    observation_space = gym.spaces.Dict(
        {"note": gym.spaces.Text(5), "x": gym.spaces.Box(-1, 1, (2,))}
    )
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, True, False, {}


# -- one line, before anything is written ----------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env_id=TextObservationToy-v0"], "unsupported observation['note'] space Text"),
        (["arch=cnn"], "arch 'cnn' needs image observations"),
        (["env_packages=[no_such_package]"], "env_packages: cannot import 'no_such_package'"),
        (["env_packages=['gymnasium:no_such_function']"], "cannot import 'gymnasium:no_such_"),
        (["wrappers=[gymnasium.wrappers.NoSuchWrapper]"], "wrappers: cannot import"),
        (["wrappers=[{gymnasium.wrappers.TimeLimit: 5}]"], "arguments of 'gymnasium.wrappers"),
        (["env_kwargs={bogus: 1}"], "cannot make CartPole-v1"),
        (["env_kwargs=[1]"], "env_kwargs must be a mapping"),
        (["lr=.inf"], "lr must be finite"),
        (["damping=.inf"], "damping must be finite"),
        (["lr=.nan"], "lr must be finite"),
        (["lr=1.0e+200"], "lr must be <= 1e+06"),
    ],
)
def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, capsys, overrides, message):
    if "TextObservationToy-v0" not in gym.registry:
        gym.register("TextObservationToy-v0", entry_point=TextObservationToy)
    run = tmp_path / "run"
    sets = [x for o in overrides for x in ("--set", o)]
    one_line_error(capsys, train(run, 160, *sets), message)
    assert not run.exists()


def test_a_checkpoint_that_does_not_fit_is_one_line(finished_run, tmp_path, capsys):
    last = finished_run / "last.pt"
    before = digest(finished_run)
    code = train_main(["--resume", str(last), "--set", "hidden=[32]", "--total-timesteps", "320"])
    one_line_error(capsys, code, "the checkpoint's policy does not fit this run")
    payload = ckpt.load_checkpoint(last)
    payload["config"]["hidden"] = [16, 16]  # a checkpoint whose network is not its config's
    ckpt.save_checkpoint(tmp_path / "odd.pt", payload)
    one_line_error(capsys, evaluate_main([str(tmp_path / "odd.pt")]), "does not fit this run")
    del payload["optimizer"]
    payload["config"]["hidden"] = [64, 64]
    ckpt.save_checkpoint(tmp_path / "x" / "no_opt.pt", payload)
    code = train_main(["--resume", str(tmp_path / "x" / "no_opt.pt"), "--total-timesteps", "320"])
    one_line_error(capsys, code, "lacks optimizer")
    assert digest(finished_run) == before


def test_flipped_bytes_in_a_checkpoint_are_detected(finished_run, tmp_path, capsys):
    data = bytearray((finished_run / "last.pt").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupted|unreadable"):
        ckpt.load_checkpoint(bad)
    one_line_error(capsys, evaluate_main([str(bad)]), str(bad))


def test_a_nan_policy_is_not_evaluated(finished_run, tmp_path, capsys):
    payload = ckpt.load_checkpoint(finished_run / "last.pt")
    next(iter(payload["policy"].values())).fill_(float("nan"))
    ckpt.save_checkpoint(tmp_path / "nan.pt", payload)
    one_line_error(capsys, evaluate_main([str(tmp_path / "nan.pt")]), "non-finite parameters")


def test_counts_in_float_notation_are_accepted_and_rounding_is_announced(tmp_path, capsys):
    assert load_config(CARTPOLE, ["total_timesteps=1e5", "lr=1e-3"]).total_timesteps == 100_000
    args = ["--config", CARTPOLE, "--log-dir", str(tmp_path / "run"), "--total-timesteps", "2e2"]
    assert train_main([*args, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "not a multiple of the batch (16 = n_envs x n_steps x ranks): the run ends at 208" in out
    with pytest.raises(ValueError, match="total_timesteps must be int"):
        load_config(CARTPOLE, ["total_timesteps=12.5"])


# -- numerics ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:learning rate")
def test_the_optimizer_rejects_infinite_settings_and_skips_an_infinite_lr():
    model = nn.Linear(3, 2)
    bad = (
        {"lr": float("inf")},
        {"lr": 1e200},
        {"damping": float("inf")},
        {"kl_clip": float("nan")},
    )
    for kwargs in bad:
        with pytest.raises(ValueError):
            KFAC(model, **kwargs)
    opt = KFAC(model)
    with pytest.raises(ValueError, match="damping"):
        opt.set_damping(float("inf"))
    x = torch.randn(8, 3)
    for lr in (float("inf"), 1e200, float("nan")):  # a schedule gone wrong
        opt.param_groups[0]["lr"] = lr
        opt.fisher_backward(F.cross_entropy(model(x), torch.randint(0, 2, (8,))))
        opt.zero_grad()
        F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.counters["skipped_steps"] == 3


# -- signals ----------------------------------------------------------------------------------
def run_and_signal(run: Path, sig: int, steps: int) -> tuple[int, str]:
    """Start a training subprocess, send ``sig`` once it is past its first checkpoint."""
    cmd = [
        sys.executable,
        "scripts/train.py",
        "--config",
        CARTPOLE,
        "--log-dir",
        str(run),
        "--total-timesteps",
        str(steps),
        "--set",
        "checkpoint_interval=800",
        *SMALL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (run / "last.pt").exists(), "no first checkpoint within 120 s"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_after_a_whole_update_and_resume_reaches_the_same_counts(tmp_path, sig):
    run = tmp_path / "run"
    code, err = run_and_signal(run, sig, 200_000)
    assert code == 128 + sig, err
    assert "checkpoint saved" in err
    payload = ckpt.load_checkpoint(run / "last.pt")
    steps, updates = int(payload["timesteps"]), int(payload["updates"])
    assert steps == updates * 16 and 800 <= steps < 200_000  # whole updates only
    assert all(s <= steps for s, _, _ in read_episodes(run / "episodes.csv"))
    target = steps + 160
    assert train_main(["--resume", str(run / "last.pt"), "--total-timesteps", str(target)]) == 0
    assert train(tmp_path / "straight", target, "--set", "checkpoint_interval=800") == 0
    resumed = ckpt.load_checkpoint(run / "last.pt")
    straight = ckpt.load_checkpoint(tmp_path / "straight" / "last.pt")
    for key in ("timesteps", "updates"):
        assert int(resumed[key]) == int(straight[key])
    counters = {k: int(v) for k, v in resumed["optimizer"]["kfac"].items()}
    assert counters == {k: int(v) for k, v in straight["optimizer"]["kfac"].items()}


# -- layers K-FAC cannot precondition are named ---------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lstm = nn.Embedding(10, 4), nn.LSTM(4, 8, batch_first=True)
        self.norm, self.conv1d, self.fc = nn.LayerNorm(8), nn.Conv1d(8, 8, 1), nn.Linear(8, 3)
        self.log_std = nn.Parameter(torch.zeros(3))  # a container's own parameter: not a layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.lstm(self.emb(x))[0])
        return self.fc(self.conv1d(h.transpose(1, 2)).mean(-1)) + self.log_std


def names_in(record) -> set[str]:
    return {str(w.message).split(":")[0] for w in record if "no K-FAC block" in str(w.message)}


@pytest.mark.parametrize("given", ["model", "parameters"])
def test_every_layer_without_a_block_is_named_in_a_warning(given):
    model = Mixed()
    with pytest.warns(RuntimeWarning) as record:
        opt = KFAC(model if given == "model" else list(model.parameters()))
        x = torch.randint(0, 10, (5, 7))
        out = model(x)
        opt.fisher_backward(F.cross_entropy(out, torch.randint(0, 3, (5,))))
        opt.zero_grad()
        F.cross_entropy(out, torch.zeros(5, dtype=torch.long)).backward()
        opt.step()
    expected = (
        {"emb", "norm", "conv1d"} if given == "model" else {"embedding0", "layernorm1", "conv1d2"}
    )
    assert names_in(record) == expected
    assert {b.module for b in opt.blocks} == {model.fc, model.lstm}  # LSTM: rl_kfac.recurrent
    assert all(w.filename == __file__ for w in record)  # they point at the caller


def test_a_bias_left_out_of_the_optimizer_stays_fixed_and_the_weight_is_preconditioned():
    layer = nn.Linear(3, 2)
    bias = layer.bias.detach().clone()
    opt = KFAC([layer.weight], kl_clip=None)
    x = torch.randn(16, 3)
    out = layer(x)
    opt.fisher_backward(F.cross_entropy(out, torch.randint(0, 2, (16,))))
    opt.zero_grad()
    F.cross_entropy(out, torch.zeros(16, dtype=torch.long)).backward()
    opt.step()
    (block,) = opt.blocks
    assert block.dim_a == 3  # no bias coordinate
    assert torch.equal(layer.bias, bias)


def test_fisher_backward_on_a_loss_without_a_graph_is_an_error():
    layer = nn.Linear(3, 2)
    opt = KFAC(layer)
    with torch.no_grad():
        out = layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"no_grad"):
        opt.fisher_backward(F.cross_entropy(out, torch.zeros(4, dtype=torch.long)))


def test_sb3_classes_log_under_their_own_names_and_show_a_progress_bar(tmp_path):
    from rl_kfac.sb3 import ACKTR, PPOKFAC

    for cls in (ACKTR, PPOKFAC):
        extra = {"batch_size": 8} if cls is PPOKFAC else {}
        model = cls("MlpPolicy", "CartPole-v1", n_steps=8, tensorboard_log=str(tmp_path), **extra)
        model.learn(16, progress_bar=True)
        assert (tmp_path / f"{cls.__name__}_1").is_dir()


@pytest.mark.parametrize("updates", [1, 2])
def test_a_stop_in_the_last_update_finishes_the_run_and_earlier_stops_it(
    tmp_path, monkeypatch, updates
):
    from agents import trainer as trainer_module
    from agents.signals import StopSignals, TrainingInterrupted

    def signalled(self: StopSignals) -> StopSignals:
        self.received = signal.SIGTERM  # as if it came during the first update
        return self

    monkeypatch.setattr(trainer_module.StopSignals, "__enter__", signalled)
    cfg = load_config(CARTPOLE, ["n_envs=2", "n_steps=8", f"total_timesteps={16 * updates}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    if updates == 1:
        assert trainer.train().timesteps == 16  # finished: nothing left to stop
        assert (tmp_path / "run" / "result.json").exists()
    else:
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train()
        assert stopped.value.exit_code == 143
        assert int(ckpt.load_checkpoint(tmp_path / "run" / "last.pt")["timesteps"]) == 16
        trainer.close()


# -- non-finite input from the environment ------------------------------------------------------
class Poisoned(gym.Env):
    """CartPole-like toy whose observations and rewards are sometimes NaN or infinite."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        obs = self.np_random.normal(size=3).astype(np.float32)
        if self.t % 7 == 0:
            obs[1] = np.nan
        if self.t % 11 == 0:
            obs[0] = -np.inf
        reward = np.inf if self.t % 5 == 0 else float(action)
        return obs, reward, False, self.t >= 30, {}


def test_nan_and_inf_from_the_environment_never_reach_the_parameters(tmp_path):
    if "Poisoned-v0" not in gym.registry:
        gym.register("Poisoned-v0", entry_point=Poisoned)
    overrides = ["env_id=Poisoned-v0", "n_envs=2", "n_steps=8", "total_timesteps=640"]
    cfg = load_config(CARTPOLE, [*overrides, "normalize_obs=true"])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        trainer.train()
    assert trainer.collector.nonfinite_inputs > 0
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    assert np.isfinite(trainer.normalizer.state_dict()["obs"]["mean"]).all()
    assert trainer.algo.optimizer.counters["skipped_steps"] == 0  # nothing left to skip


# -- SIGKILL at random points, checkpoint writes included ------------------------------------------
def test_sigkill_at_random_points_leaves_a_loadable_checkpoint_that_resumes(tmp_path):
    rng = np.random.default_rng(0)
    cmd = [sys.executable, "scripts/train.py", "--config", CARTPOLE, "--total-timesteps", "1e6"]
    cmd += ["--set", "checkpoint_interval=16", *SMALL]  # a checkpoint write every update
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(3):
        run = tmp_path / f"run{trial}"
        proc = subprocess.Popen([*cmd, "--log-dir", str(run)], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        proc.kill()
        proc.wait(timeout=60)
        payload = ckpt.load_checkpoint(run / "last.pt")  # intact, whatever was being written
        steps = int(payload["timesteps"])
        assert steps == int(payload["updates"]) * 16
        target = steps + 64
        assert train_main(["--resume", str(run / "last.pt"), "--total-timesteps", str(target)]) == 0
        resumed = ckpt.load_checkpoint(run / "last.pt")
        assert int(resumed["timesteps"]) == target and int(resumed["updates"]) == target // 16
        episodes = read_episodes(run / "episodes.csv")
        assert [s for s, _, _ in episodes] == sorted(s for s, _, _ in episodes)
        assert not list(run.glob("*.tmp"))  # a write the kill cut short is cleaned up


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_system():
    import ctypes
    import ctypes.util

    from agents.memory import release_free_heap, rss_mib

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: these blocks come from the heap, as in training
    try:
        before = rss_mib()
        blocks = [libc.malloc(60_000) for _ in range(3000)]  # ~170 MiB, touched below
        for b in blocks:
            ctypes.memset(b, 1, 60_000)
        for b in blocks[:-1]:  # the last one pins the heap's top: free() alone cannot shrink it
            libc.free(b)
        held = rss_mib()
        assert release_free_heap()
        after = rss_mib()
        libc.free(blocks[-1])
    finally:
        libc.mallopt(-3, 128 * 1024)
    assert before is not None and held is not None and after is not None
    assert held - before > 100
    assert after - before < 20
