"""The thread policy: one thread for small networks, idle cores for convolutional ones."""

from __future__ import annotations

import os

import pytest
from torch import nn

from agents.config import load_config
from rl_kfac.threads import auto_threads, idle_cores, usable_cores


def test_small_networks_get_one_thread_and_convolutions_the_idle_cores():
    mlp = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
    assert auto_threads(mlp, idle=8.0) == 1
    cnn = nn.Sequential(nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Flatten())
    cores = usable_cores()
    assert auto_threads(cnn, idle=float(cores)) == cores
    assert auto_threads(cnn, idle=0.2) == 1  # every core busy: still one
    assert auto_threads(cnn, idle=float(cores), processes=cores) == 1
    big = nn.Linear(1000, 1001)  # over a million parameters
    assert auto_threads(big, idle=float(cores)) == cores
    assert 0.0 <= idle_cores(0.05) <= (os.cpu_count() or 1) + 0.5  # all of the host's cores


def test_threads_setting_is_validated():
    assert load_config("configs/acktr/cartpole.yaml", ["threads=2"]).threads == 2
    with pytest.raises(ValueError, match="threads must be >= 1"):
        load_config("configs/acktr/cartpole.yaml", ["threads=0"])
