"""Atomic, checksummed checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds the model, the optimizer (K-FAC factors and eigenbases), normalisation
statistics, counters, the resolved config and every RNG state (python, numpy, torch, CUDA).
Environment internals are not saved: a resumed run resets its environments with a new seed.

On disk the payload's own ``torch.save`` bytes sit in a uint8 tensor next to their SHA-256
(torch does not check its zip CRCs, so a flipped byte would otherwise load silently); loading
verifies the digest first. Checkpoints written before the digest existed still load.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


FORMAT = "rl-kfac-checkpoint/sha256"
REQUIRED = ("policy", "optimizer", "normalizer", "timesteps", "updates", "rng", "config")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    wrapped = {
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(wrapped, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # writes a killed process left
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, required: tuple[str, ...] = REQUIRED) -> dict[str, Any]:
    """Load and verify a checkpoint; ``ValueError`` with one line if it is missing, unreadable,
    corrupted (digest mismatch) or lacks one of the ``required`` entries."""
    if Path(path).is_dir():
        raise ValueError(f"checkpoint {path} is a directory (its last.pt?)")
    payload = _load(path, Path(path))
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        data = payload.get("data")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
            raise ValueError(f"checkpoint {path} is corrupted (no data)")
        raw = data.numpy().tobytes()
        if hashlib.sha256(raw).hexdigest() != payload.get("sha256"):
            raise ValueError(f"checkpoint {path} is corrupted: its SHA-256 does not match")
        payload = _load(path, io.BytesIO(raw))
    if not isinstance(payload, dict) or "policy" not in payload or "config" not in payload:
        raise ValueError(f"checkpoint {path} is not an rl-kfac checkpoint")
    missing = [key for key in required if key not in payload]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    return payload


def _load(path: str | Path, source: Path | io.BytesIO) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # pickle/zip errors have many types
        raise ValueError(f"checkpoint {path} is unreadable: {type(err).__name__}") from None


def restore(target: Any, state: Any, what: str) -> None:
    """``target.load_state_dict(state)``; a mismatch (another network, a changed config) as a
    one-line ``ValueError``."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise ValueError(f"the checkpoint's {what} does not fit this run: {detail}") from None


def check_finite(module: torch.nn.Module, path: str | Path) -> None:
    """``ValueError`` if a parameter of ``module`` is NaN or infinite."""
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"checkpoint {path} has non-finite parameters: {', '.join(bad[:3])}")
