"""The GPU path (skipped without CUDA): the K-FAC step, the background mode's side stream and a
short training run on the device, against the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents.config import load_config
from agents.trainer import Trainer
from rl_kfac import KFAC

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(device: str, **kwargs) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model = model.double().to(device)
    opt = KFAC(model, inverse_update_interval=2, factor_dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64).to(device)
        y = torch.randint(0, 4, (16,), generator=gen).to(device)
        sampled = torch.randint(0, 4, (16,), generator=gen).to(device)
        out = model(x)
        opt.fisher_backward(F.cross_entropy(out, sampled))
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("inverse_mode", ["sync", "background"])
def test_cuda_steps_match_cpu(inverse_mode):
    for p, q in zip(run("cpu", inverse_mode=inverse_mode), run("cuda", inverse_mode=inverse_mode)):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_training_runs_on_the_device(tmp_path):
    cfg = load_config("configs/acktr/cartpole.yaml", ["device=cuda", "total_timesteps=640"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    result = trainer.train()
    assert result.timesteps == 640
    assert all(p.is_cuda for p in trainer.policy.parameters())
    assert trainer.collector.obs.is_cuda


def test_the_step_takes_no_host_round_trip():
    """host_sync "auto" on CUDA: after a layer's first factors and eigenbasis (checked on the
    host once), statistics, step and counters stay on the device until they are read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).cuda()
    opt = KFAC(model, momentum=0.9, inverse_update_interval=1000)
    x, y = torch.randn(64, 6, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    for i in range(4):
        if i == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(x)
            noise = torch.empty_like(out).exponential_().log()
            sampled = (out.detach() - noise).argmax(-1)  # Gumbel-max; Categorical validates
            opt.fisher_backward(F.cross_entropy(out, sampled))
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.counters["steps"] == 4 and opt.counters["skipped_steps"] == 0
    assert 0 < opt.diagnostics.step_scale <= 1
