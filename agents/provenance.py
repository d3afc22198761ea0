"""Which code produced a result: the git commit and the package versions."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository, for a source checkout
CODE = ("rl_kfac", "agents", "configs", "scripts", "pyproject.toml")


def provenance() -> dict[str, str]:
    """The commit (``+dirty`` if code or configs had uncommitted changes; ``unknown`` outside a
    git checkout) and the versions of torch, gymnasium and Stable-Baselines3."""
    import gymnasium
    import stable_baselines3
    import torch

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no", "--", *CODE):
        commit += "+dirty"
    return {
        "commit": commit,
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "sb3": stable_baselines3.__version__,
    }


def device_name(device: str | torch.device) -> str:
    """``cpu``, or the accelerator's type and model (``cuda: NVIDIA H200``): wall times in
    results are only comparable on the same hardware."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type
