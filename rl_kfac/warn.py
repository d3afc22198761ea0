"""Warnings that point at the user's line, once per kind."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from types import FrameType

import torch

# frames a warning should not point at: this package, torch (its no_grad wrappers), contextlib
_INTERNAL = (
    str(Path(__file__).parent) + os.sep,
    str(Path(torch.__file__).parent) + os.sep,
    contextlib.__file__,
)


def caller_level() -> int:
    """``stacklevel`` that points a warning at the first frame outside rl_kfac and torch."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def warn_once(seen: set[str], key: str, message: str) -> None:
    """A ``RuntimeWarning`` unless ``key`` is in ``seen`` (then added)."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=caller_level())
