"""Environment construction: ale-py's native Atari vector env and the episode records."""

from __future__ import annotations

import numpy as np
import pytest

from agents.config import load_config
from agents.envs import finished_episodes, make_vec_env, rom_name


def test_rom_names():
    assert rom_name("ALE/Pong-v5") == "pong"
    assert rom_name("ALE/SpaceInvaders-v5") == "space_invaders"
    assert rom_name("ALE/TicTacToe3D-v5") == "tic_tac_toe_3d"


def test_native_atari_env_layout_and_clipped_rewards():
    envs = make_vec_env("ALE/Breakout-v5", 2, "auto", 4)  # auto: native for ALE ids
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    rng = np.random.default_rng(0)
    rewards = []
    for _ in range(200):
        obs, reward, *_ = envs.step(rng.integers(0, 4, size=2))
        rewards.append(reward)
    assert set(np.unique(np.concatenate(rewards))) <= {-1.0, 0.0, 1.0}
    envs.close()


def test_finished_episodes_from_either_info_layout():
    per_env = {
        "final_info": {
            "episode": {"r": np.array([0.0, 7.0]), "l": np.array([0, 9])},
            "_episode": np.array([False, True]),
        }
    }
    vector = {
        "episode": {"r": np.array([3.0, 0.0]), "l": np.array([5, 0])},
        "_episode": np.array([True, False]),
    }
    assert finished_episodes(per_env) == [(7.0, 9)]
    assert finished_episodes(vector) == [(3.0, 5)]
    assert finished_episodes({}) == []


def test_native_needs_an_atari_id():
    with pytest.raises(ValueError, match="native"):
        load_config("configs/acktr/cartpole.yaml", ["vec_env=native"])
