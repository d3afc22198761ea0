"""Observation spaces: which ones a policy takes, how composite ones are flattened, where the
images are.

Rollout storage holds one tensor per step, so observations that are not a ``Box`` are flattened
by the environment wrapper :class:`EncodeObservation`, with Gymnasium's own ``flatten``: a
``Discrete`` becomes a one-hot vector, a ``MultiDiscrete`` concatenated one-hots, a
``MultiBinary`` its bits, a ``Tuple`` or ``Dict`` its parts side by side in the space's order.
The flattened space (:class:`EncodedBox`) remembers the original, so the network can cut the
vector back into its parts (:func:`observation_parts`) and give each image part a CNN.

Images are recognised as Stable-Baselines3 recognises them: a 3-D ``uint8`` Box with bounds 0
and 255; the smallest of the three dimensions is the channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

OBSERVATION_SPACES = "Box, Discrete, MultiDiscrete, MultiBinary, and Tuple or Dict of these"
_LEAVES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class EncodedBox(gym.spaces.Box):
    """The flat ``Box`` of a non-Box observation space; ``source`` is the original space."""

    source: gym.Space

    def __repr__(self) -> str:
        return f"EncodedBox({self.shape}, {self.dtype}, source={self.source})"


def encoded_space(space: gym.Space) -> EncodedBox:
    flat = gym.spaces.flatten_space(space)
    assert isinstance(flat, gym.spaces.Box)
    box = EncodedBox(flat.low, flat.high, flat.shape, flat.dtype)
    box.source = space
    return box


class EncodeObservation(gym.ObservationWrapper):
    """Flattens a non-Box observation space (see the module docstring)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        check_observation_space(env.observation_space)
        self.observation_space = encoded_space(env.observation_space)

    def observation(self, observation: Any) -> np.ndarray:
        return gym.spaces.flatten(self.env.observation_space, observation)  # type: ignore[return-value]


def is_image(space: gym.Space) -> bool:
    return (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and bool(np.all(space.low == 0))
        and bool(np.all(space.high == 255))
    )


def channels_first(shape: tuple[int, ...]) -> bool:
    """Whether an image of this shape is (C, H, W): its smallest dimension comes first."""
    return int(np.argmin(shape)) == 0


def image_chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    c, h, w = shape if channels_first(shape) else (shape[2], shape[0], shape[1])
    return int(c), int(h), int(w)


def check_observation_space(space: gym.Space, path: str = "observation") -> None:
    """A one-line ``ValueError`` naming the first part of ``space`` a policy cannot take."""
    if isinstance(space, (gym.spaces.Tuple, gym.spaces.Dict)):
        if not space.spaces:
            raise ValueError(f"{path} is an empty {type(space).__name__} space")
        items = space.spaces.items() if isinstance(space, gym.spaces.Dict) else enumerate(space)
        for key, sub in items:
            check_observation_space(sub, f"{path}[{key!r}]")
        return
    if not isinstance(space, _LEAVES):
        raise ValueError(
            f"unsupported {path} space {space}: use {OBSERVATION_SPACES} (a wrapper can turn "
            "other spaces into these: `wrappers` in the config)"
        )
    if isinstance(space, gym.spaces.Box) and not (
        np.issubdtype(space.dtype, np.number) or space.dtype == np.bool_
    ):
        raise ValueError(f"unsupported {path} space {space}: a Box of numbers or bools")


@dataclass(frozen=True)
class Part:
    """One leaf of an observation space: ``flat[start:stop]`` of the flattened observation."""

    path: str
    start: int
    stop: int
    shape: tuple[int, ...]
    image: bool


def observation_parts(space: gym.Space) -> list[Part]:
    """The leaves of ``space`` (an :class:`EncodedBox`'s source, or any supported space) with
    their slices of the flattened observation, in Gymnasium's flatten order."""
    source = space.source if isinstance(space, EncodedBox) else space
    parts: list[Part] = []

    def walk(sub: gym.Space, path: str) -> None:
        if isinstance(sub, gym.spaces.Dict):
            for key, s in sub.spaces.items():
                walk(s, f"{path}[{key!r}]")
        elif isinstance(sub, gym.spaces.Tuple):
            for i, s in enumerate(sub.spaces):
                walk(s, f"{path}[{i}]")
        else:
            start = parts[-1].stop if parts else 0
            size = gym.spaces.flatdim(sub)
            shape = tuple(sub.shape or ()) if is_image(sub) else (size,)
            parts.append(Part(path, start, start + size, shape, is_image(sub)))

    check_observation_space(source)
    walk(source, "observation")
    return parts
