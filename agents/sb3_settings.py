"""Our tuned configs as settings of ``rl_kfac.sb3.ACKTR`` / ``PPOKFAC`` in rl-baselines3-zoo's
hyperparameter format.

Tuned hyperparameters live once, in ``configs/<algo>/*.yaml``. ``configs/zoo/*.yml`` are made from
them by ``python scripts/zoo.py --write-hyperparams`` (a test checks they are up to date), and the
benchmark's ``sb3_acktr`` runs use the same entries. Keys at the class's own default are left
out, as rl-zoo's files do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agents.config import Config, load_config
from agents.envs import is_atari
from rl_kfac.damping import KLDampingController

HEADER = """\
# rl_kfac.sb3.{cls} in rl-baselines3-zoo's format (python scripts/zoo.py --algo {algo}).
# Generated from configs/{algo}/*.yaml by `python scripts/zoo.py --write-hyperparams`; do not edit.
# Not expressible here: SB3's CnnPolicy uses the Nature CNN (64 filters in the last conv layer,
# where our agents' configs use the ACKTR paper's 32); SB3's AtariWrapper presses FIRE on reset.
"""
_KL_CONTROLLER = KLDampingController()  # its defaults: only other values are written


def _sb3_class(algo: str) -> Any:
    from rl_kfac.sb3 import ACKTR, PPOKFAC

    return {"acktr": ACKTR, "ppo_kfac": PPOKFAC}[algo]


def sb3_arguments(cfg: Config) -> dict[str, Any]:
    """Every SB3 class argument ``cfg`` determines."""
    if cfg.damping_adaptation == "lm":
        raise ValueError("rl_kfac.sb3 has no Levenberg-Marquardt damping (damping_adaptation lm)")
    if cfg.vf_steps:
        raise ValueError("rl_kfac.sb3.ACKTR has no value-only steps (vf_steps)")
    if cfg.shared_trunk:
        raise ValueError("SB3's MLP policies have separate actor and critic networks")
    if cfg.recurrent != "none":
        raise ValueError(
            f"recurrent {cfg.recurrent!r}: these settings are not translated to "
            "rl_kfac.sb3.RecurrentPPOKFAC (train recurrent configs with scripts/train.py)"
        )
    args: dict[str, Any] = {
        "learning_rate": f"lin_{cfg.lr:g}" if cfg.lr_schedule == "linear" else cfg.lr,
        "n_steps": cfg.n_steps,
        "gamma": cfg.gamma,
        "gae_lambda": cfg.gae_lambda,
        "ent_coef": cfg.ent_coef,
        "vf_coef": cfg.vf_coef,
        "kl_clip": cfg.kl_clip,
        "kl_clip_lr": cfg.kl_clip_lr,
        "damping": cfg.damping,
        "momentum": cfg.momentum,
        "stat_decay": cfg.stat_decay,
        "factor_update_interval": cfg.factor_update_interval,
        "inverse_update_interval": cfg.inverse_update_interval,
        "vf_fisher_coef": cfg.vf_fisher_coef,
        "vf_kl_clip": cfg.vf_kl_clip,
        "damping_target_kl": cfg.damping_target_kl if cfg.damping_adaptation == "kl" else None,
        "kl_clip_target": cfg.kl_clip_target,
        "kl_guard": cfg.kl_guard,
        "kl_guard_backtracks": cfg.kl_guard_backtracks,
        "normalize_advantage": (
            cfg.algo == "ppo_kfac" if cfg.normalize_advantage is None else cfg.normalize_advantage
        ),
    }
    if cfg.max_grad_norm is not None:
        args["max_grad_norm"] = cfg.max_grad_norm
    if cfg.algo == "ppo_kfac":
        args.update(
            batch_size=cfg.batch_size,
            n_epochs=cfg.n_epochs,
            clip_range=cfg.clip_range,
            clip_range_vf=cfg.clip_range_vf,
            target_kl=cfg.target_kl,
        )
    if cfg.damping_adaptation == "kl":
        controller = {
            "rate": cfg.damping_rate,
            "max_factor": cfg.damping_max_factor,
            "damping_min": cfg.damping_min,
            "damping_max": cfg.damping_max,
            "target_schedule": cfg.damping_target_schedule,
            "hold_when_clipped": cfg.damping_hold_when_clipped,
        }
        own = {k: v for k, v in controller.items() if getattr(_KL_CONTROLLER, k) != v}
        if own:
            args["damping_kwargs"] = own
    return args


def _policy_kwargs(cfg: Config) -> str | None:
    """SB3 ``policy_kwargs`` as rl-zoo writes them (a ``dict(...)`` expression)."""
    parts = []
    if not cfg.expects_images() and list(cfg.hidden) != [64, 64]:
        parts.append(f"net_arch=dict(pi={list(cfg.hidden)}, vf={list(cfg.hidden)})")
    if cfg.activation == "relu":
        parts.append("activation_fn=nn.ReLU")
    if cfg.log_std_init != 0.0:
        parts.append(f"log_std_init={cfg.log_std_init:g}")
    if cfg.log_std_fisher:
        parts.append("log_std_fisher=True")
    if not cfg.ortho_init:
        parts.append("ortho_init=False")
    if not cfg.normalize_images:
        parts.append("normalize_images=False")
    optimizer = {
        "damping_mode": "exact",
        "conv_approx": "expand",
        "weight_decay": 0.0,
        "statistics_rows": None,
        "inverse_mode": "sync",
    }
    own = {k: getattr(cfg, k) for k, v in optimizer.items() if getattr(cfg, k) != v}
    if own:
        parts.append(f"optimizer_kwargs=dict({', '.join(f'{k}={v!r}' for k, v in own.items())})")
    return f"dict({', '.join(parts)})" if parts else None


def zoo_entry(cfg: Config) -> dict[str, Any]:
    """``cfg`` as one entry of rl-zoo's ``<algo>.yml`` for ``rl_kfac.sb3``'s class."""
    entry: dict[str, Any] = {}
    if is_atari(cfg.env_id):
        # as our agents' env: an episode is a whole game, not one life
        wrapper = "stable_baselines3.common.atari_wrappers.AtariWrapper"
        entry["env_wrapper"] = [{wrapper: {"terminal_on_life_loss": False}}]
        entry["env_kwargs"] = {"frameskip": 1}  # AtariWrapper skips frames itself
        entry["frame_stack"] = cfg.frame_stack
    entry.update(
        n_envs=cfg.n_envs,
        n_timesteps=float(cfg.total_timesteps),
        policy="CnnPolicy" if cfg.expects_images() else "MlpPolicy",
    )
    if cfg.env_kwargs:
        entry["env_kwargs"] = {**entry.get("env_kwargs", {}), **cfg.env_kwargs}
    if cfg.wrappers:  # env_packages: rl-zoo's --gym-packages on its command line
        entry["env_wrapper"] = [*entry.get("env_wrapper", []), *cfg.wrappers]
    if cfg.normalize_obs or cfg.normalize_reward:
        entry["normalize"] = (
            True
            if cfg.normalize_obs and cfg.normalize_reward
            else f"dict(norm_obs={cfg.normalize_obs}, norm_reward={cfg.normalize_reward})"
        )
    defaults = _sb3_class(cfg.algo).defaults
    for key, value in sb3_arguments(cfg).items():
        if key not in defaults or defaults[key] != value:
            entry[key] = value
    policy_kwargs = _policy_kwargs(cfg)
    if policy_kwargs is not None:
        entry["policy_kwargs"] = policy_kwargs
    return entry


def zoo_hyperparams(algo: str, root: str | Path = "configs") -> str:
    """The YAML text of ``configs/zoo/<algo>.yml``: one entry per ``configs/<algo>/*.yaml``."""
    entries = {}
    for path in sorted(Path(root, algo).glob("*.yaml")):
        cfg = load_config(path)
        if cfg.recurrent == "none":  # recurrent configs are not translated to RecurrentPPOKFAC
            entries[cfg.env_id] = zoo_entry(cfg)
    cls = _sb3_class(algo).__name__
    return HEADER.format(cls=cls, algo=algo) + yaml.safe_dump(entries, sort_keys=False)
