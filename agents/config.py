"""Training configuration: one flat dataclass, loaded from YAML, overridable with ``key=value``.

Defaults are the ACKTR paper / OpenAI baselines values (Wu et al. 2017): lr 0.25 with a linear
decay to 0, kl_clip 1e-3, damping 1e-2, stat_decay 0.99, momentum 0.9, n_steps 20, ent_coef 0.01,
vf_coef 0.5, inverse every 10 updates. n-step returns are written as GAE with ``gae_lambda = 1``
(identical), and the value head's Fisher is the paper's σ = 1 Gaussian (``vf_fisher_coef = 1``;
baselines' code weighs it 4×, which is ``vf_fisher_coef = 2`` here, see ``rl_kfac.actor_critic``).
Per-environment configs in configs/ say where they differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agents.envs import is_atari
from agents.networks import Activation, Arch, PolicySpec, Recurrent
from rl_kfac import ConvApprox, DampingMode
from rl_kfac.curvature import InverseMode
from rl_kfac.damping import TargetSchedule
from rl_kfac.optimizer import MAX_LR, ClipLR
from rl_kfac.recurrent import RecurrentApprox

Algo = Literal["acktr", "ppo_kfac"]
VecEnvKind = Literal["auto", "sync", "async", "native"]  # auto: native for ALE ids, else sync
LRSchedule = Literal["linear", "constant"]  # linear: to 0 at total_timesteps
DampingAdaptation = Literal["none", "kl", "lm"]  # kl: toward damping_target_kl; lm: Martens 2010


@dataclass
class Config:
    algo: Algo = "acktr"
    env_id: str = "CartPole-v1"
    n_envs: int = 16  # environments stepped together; a rollout is n_envs x n_steps
    n_steps: int = 20
    total_timesteps: int = 100_000
    seed: int = 0  # torch, numpy, python and the environments
    device: str = "auto"  # auto: CUDA when available; cpu, cuda, cuda:N
    vec_env: VecEnvKind = "auto"  # async: one process per env; native: ale-py (agents.envs)
    threads: int | None = None  # torch intra-op threads; null: rl_kfac.threads.auto_threads
    frame_stack: int = 4  # Atari only
    # environments from other packages (agents.envs): modules to import, or module:function to
    # call, before making env_id; keyword arguments of gym.make; wrappers, each "module.Class"
    # or {"module.Class": {keyword: value}}, applied in order
    env_packages: list[str] = field(default_factory=list)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    wrappers: list[str | dict[str, Any]] = field(default_factory=list)
    # returns
    gamma: float = 0.99
    gae_lambda: float = 1.0  # 1.0: n-step returns, as ACKTR
    normalize_obs: bool = False
    normalize_reward: bool = False
    # losses
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    vf_fisher_coef: float = 1.0
    # the value-only parameters' own trust region (.inf: unclipped); null: the policy's
    vf_kl_clip: float | None = None
    vf_steps: int = 0  # ACKTR: K-FAC steps on the value loss alone after each update
    max_grad_norm: float | None = None
    # K-FAC
    lr: float = 0.25
    lr_schedule: LRSchedule = "linear"
    kl_clip: float | None = 1e-3
    # the lr the clip is computed at (rl_kfac.KFAC): current (ACKTR's: a clipped step's length
    # does not depend on lr) or initial (lr_schedule scales clipped steps too)
    kl_clip_lr: ClipLR = "current"
    damping: float = 1e-2
    damping_mode: DampingMode = "exact"
    stat_decay: float = 0.99
    momentum: float = 0.9
    weight_decay: float = 0.0
    factor_update_interval: int = 1
    inverse_update_interval: int = 10
    conv_approx: ConvApprox = "expand"
    recurrent_approx: RecurrentApprox = "expand"  # steps of LSTM/GRU layers (rl_kfac.recurrent)
    statistics_rows: int | None = None  # A, G from this many sampled rows per layer (KFAC docs)
    inverse_mode: InverseMode = "sync"  # background: eigendecompositions in a worker thread
    # damping adaptation (rl_kfac.damping)
    damping_adaptation: DampingAdaptation = "none"
    damping_target_kl: float = 0.01
    damping_rate: float = 0.5
    damping_max_factor: float = 2.0
    damping_min: float = 1e-4
    damping_max: float = 1.0
    damping_target_schedule: TargetSchedule = "constant"  # or lr_squared (rl_kfac.damping)
    damping_hold_when_clipped: bool = False  # keep λ when the clip, not λ, kept the KL low
    lm_omega: float = 1.5
    # trust-region radius adaptation (rl_kfac.trust_region): kl_clip moves toward this measured
    # KL per update; null: kl_clip stays fixed
    kl_clip_target: float | None = None
    # KL guard (rl_kfac.kl_guard): a step whose measured KL exceeds kl_guard · kl_clip is shrunk
    # (up to kl_guard_backtracks times) or undone; null: off, the exact ACKTR step
    kl_guard: float | None = None
    kl_guard_backtracks: int = 5
    # PPO-KFAC
    n_epochs: int = 4
    batch_size: int = 64
    clip_range: float = 0.2
    clip_range_vf: float | None = None
    # advantages to zero mean, unit std per (mini)batch; null: PPO-KFAC yes, ACKTR no (as SB3's
    # PPO and A2C)
    normalize_advantage: bool | None = None
    target_kl: float | None = None  # early stop of an update's epochs
    # network
    arch: Arch = "auto"  # auto: a CNN for image observations (by size), else an MLP
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: Activation = "tanh"
    shared_trunk: bool = False
    cnn_last_filters: int = 32
    normalize_images: bool = True  # uint8 images / 255; off for grids of codes (MiniGrid)
    log_std_init: float = 0.0
    # the Gaussian log-std preconditioned by its exact Fisher (2 per dimension: step g / (2 + λ))
    # instead of taking the plain gradient
    log_std_fisher: bool = False
    ortho_init: bool = True
    recurrent: Recurrent = "none"  # lstm | gru: a recurrent core after the encoder
    hidden_size: int = 64  # its width
    shared_core: bool = True  # false: the critic gets a recurrent core of its own
    # bookkeeping
    log_interval: int = 10  # updates between TensorBoard writes
    checkpoint_interval: int = 100_000  # timesteps between periodic checkpoints

    def expects_images(self) -> bool:
        """Whether the network will be a CNN, known without making the environment: the arch
        names one, or ``auto`` on an Atari id."""
        return self.arch not in ("auto", "mlp") or (self.arch == "auto" and is_atari(self.env_id))

    def env_options(self) -> dict[str, Any]:
        """The keyword arguments of ``agents.envs.make_vec_env`` besides id and count."""
        return {
            "vec_env": self.vec_env,
            "frame_stack": self.frame_stack,
            "env_kwargs": self.env_kwargs,
            "wrappers": self.wrappers,
            "env_packages": self.env_packages,
        }

    def policy_spec(self) -> PolicySpec:
        return PolicySpec(
            arch=self.arch,
            hidden=tuple(self.hidden),
            activation=self.activation,
            shared_trunk=self.shared_trunk,
            cnn_last_filters=self.cnn_last_filters,
            normalize_images=self.normalize_images,
            log_std_init=self.log_std_init,
            ortho_init=self.ortho_init,
            recurrent=self.recurrent,
            hidden_size=self.hidden_size,
            shared_core=self.shared_core,
        )

    def validate(self) -> Config:
        """Raise ``ValueError`` with one line naming the first invalid value."""
        positive = (
            "n_envs",
            "n_steps",
            "total_timesteps",
            "lr",
            "damping",
            "log_interval",
            "checkpoint_interval",
            "frame_stack",
            "factor_update_interval",
            "inverse_update_interval",
            "cnn_last_filters",
            "hidden_size",
            "n_epochs",
            "batch_size",
            "clip_range",
            "damping_target_kl",
            "damping_rate",
            "damping_min",
        )
        for name in TYPES:
            value = getattr(self, name)
            unbounded = name == "vf_kl_clip" and value == math.inf  # inf: no clip
            if isinstance(value, float) and not math.isfinite(value) and not unbounded:
                raise ValueError(f"{name} must be finite, got {value}")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lr > MAX_LR:
            raise ValueError(f"lr must be <= {MAX_LR:g}, got {self.lr}")
        for name, kind in TYPES.items():
            allowed = _choices(kind)
            if allowed and getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("stat_decay", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("ent_coef", "vf_coef", "vf_fisher_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_clip is not None and self.kl_clip <= 0:
            raise ValueError(f"kl_clip must be > 0 or null, got {self.kl_clip}")
        if self.kl_clip_target is not None and (self.kl_clip is None or self.kl_clip_target <= 0):
            raise ValueError(
                f"kl_clip_target must be > 0 with a kl_clip to adapt, got {self.kl_clip_target} "
                f"(kl_clip {self.kl_clip})"
            )
        if self.vf_kl_clip is not None and not self.vf_kl_clip > 0:
            raise ValueError(
                f"vf_kl_clip must be > 0 (.inf: unclipped) or null, got {self.vf_kl_clip}"
            )
        if self.kl_guard is not None and (self.kl_clip is None or self.kl_guard <= 0):
            raise ValueError(
                f"kl_guard must be > 0 with a kl_clip to guard, got {self.kl_guard} "
                f"(kl_clip {self.kl_clip})"
            )
        if self.kl_guard_backtracks < 0:
            raise ValueError(f"kl_guard_backtracks must be >= 0, got {self.kl_guard_backtracks}")
        self.policy_spec()  # its own checks (shared_core)
        if self.vec_env == "native" and not self.env_id.startswith("ALE/"):
            raise ValueError(f"vec_env 'native' is ale-py's Atari env; {self.env_id} has none")
        if self.statistics_rows is not None and self.statistics_rows < 1:
            raise ValueError(f"statistics_rows must be >= 1 or null, got {self.statistics_rows}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null (auto), got {self.threads}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if (
            self.damping_max < self.damping_min
            or self.damping_max_factor <= 1
            or self.lm_omega <= 1
        ):
            raise ValueError(
                "need damping_min <= damping_max, damping_max_factor > 1, lm_omega > 1"
            )
        if self.vf_steps < 0:
            raise ValueError(f"vf_steps must be >= 0, got {self.vf_steps}")
        if self.vf_steps and (
            self.algo != "acktr"
            or self.momentum != 0
            or self.weight_decay != 0
            or self.factor_update_interval != 1
        ):
            # momentum or weight decay would move the policy during the value-only steps; with
            # statistics every T steps the extra steps would shift which updates record them
            raise ValueError(
                "vf_steps needs algo acktr with momentum 0, weight_decay 0 and "
                "factor_update_interval 1"
            )
        if self.damping_adaptation == "lm" and (self.momentum != 0 or self.algo != "acktr"):
            raise ValueError("damping_adaptation 'lm' needs algo acktr with momentum 0")
        for name in ("clip_range_vf", "target_kl"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or null, got {getattr(self, name)}")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"hidden must be a non-empty list of positive sizes, got {self.hidden}"
            )
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPES: dict[str, Any] = typing.get_type_hints(Config)


def _choices(kind: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field (empty for other types)."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML value against the field's type (ints are accepted for floats)."""
    kind = TYPES[name]
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and type(None) in args:  # ``X | None``
        if value is None:
            return None
        (kind,) = [a for a in args if a is not type(None)]
    elif value is None:
        raise ValueError(f"{name} must not be null")
    allowed = _choices(kind)
    if allowed:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        return value
    if kind in (int, float) and isinstance(value, str):  # YAML reads 1e5 and 1e-3 as strings
        with contextlib.suppress(ValueError):
            value = (
                int(value) if kind is int and value.strip().lstrip("+-").isdigit() else float(value)
            )
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e5, 100000.0
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: number,
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind)
    if kind == list[int]:
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    wanted = {
        list[str]: "a list of strings",
        dict[str, Any]: "a mapping of names to values",
        list[str | dict[str, Any]]: "a list of 'module.Class' or {'module.Class': {kwargs}}",
    }.get(kind)
    if kind == list[str]:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind == dict[str, Any]:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    elif kind == list[str | dict[str, Any]]:
        ok = isinstance(value, list) and all(
            isinstance(v, str)
            or (isinstance(v, dict) and len(v) == 1 and isinstance(next(iter(v)), str))
            for v in value
        )
    if not ok:
        wanted = wanted or ("a list of ints" if kind == list[int] else kind.__name__)
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value) if kind is float else value


def from_dict(values: dict[str, Any]) -> Config:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(FIELDS)}")
    return Config(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``lr=0.1``, ``hidden=[32,32]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ValueError(f"cannot read config {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a mapping of keys to values")
        values.update(loaded)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return from_dict(values)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
