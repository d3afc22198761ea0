"""Policy-value networks: MLP or Nature CNN trunks with categorical or diagonal-Gaussian heads.

Action bounds (Box): actions are sampled from the unbounded Gaussian (log-probabilities and the
Fisher refer to that sample) and clipped to the bounds only when sent to the environment, as
Stable-Baselines3 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from rl_kfac.fisher import categorical_fisher_loss, gaussian_fisher_loss, sample_categorical

Arch = Literal["mlp", "cnn"]
Activation = Literal["tanh", "relu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


class Distribution:
    """A batch of action distributions: categorical (logits) or diagonal Gaussian."""

    def __init__(
        self,
        logits: Tensor | None = None,
        mean: Tensor | None = None,
        log_std: Tensor | None = None,
    ) -> None:
        self.logits, self.mean, self.log_std = logits, mean, log_std

    @property
    def discrete(self) -> bool:
        return self.logits is not None

    def __repr__(self) -> str:
        if self.logits is not None:
            return f"Distribution(categorical, logits={tuple(self.logits.shape)})"
        assert self.mean is not None
        return f"Distribution(diagonal Gaussian, mean={tuple(self.mean.shape)})"

    def sample(self) -> Tensor:
        if self.logits is not None:
            return sample_categorical(self.logits)
        assert self.mean is not None and self.log_std is not None
        return self.mean + self.log_std.exp() * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        if self.logits is not None:
            return self.logits.argmax(dim=-1)
        assert self.mean is not None
        return self.mean

    def log_prob(self, actions: Tensor) -> Tensor:
        if self.logits is not None:
            logp = self.logits.log_softmax(dim=-1)
            return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        assert self.mean is not None and self.log_std is not None
        z = (actions - self.mean) / self.log_std.exp()
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(dim=-1)

    def entropy(self) -> Tensor:
        if self.logits is not None:
            logp = self.logits.log_softmax(dim=-1)
            return -(logp.exp() * logp).sum(dim=-1)
        assert self.mean is not None and self.log_std is not None
        per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + self.log_std
        return per_dim.sum(dim=-1).expand(self.mean.shape[:-1])

    def kl(self, other: Distribution) -> Tensor:
        """KL(self ‖ other) per sample."""
        if self.logits is not None:
            assert other.logits is not None
            logp, logq = self.logits.log_softmax(-1), other.logits.log_softmax(-1)
            return (logp.exp() * (logp - logq)).sum(dim=-1)
        assert self.mean is not None and self.log_std is not None
        assert other.mean is not None and other.log_std is not None
        var_ratio = (2 * (self.log_std - other.log_std)).exp()
        t = ((self.mean - other.mean) / other.log_std.exp()).pow(2)
        return 0.5 * (var_ratio + t - 1 - var_ratio.log()).sum(dim=-1)

    def fisher_loss(self) -> Tensor:
        """Mean NLL of actions sampled from this distribution (see ``rl_kfac.fisher``)."""
        if self.logits is not None:
            return categorical_fisher_loss(self.logits)
        assert self.mean is not None and self.log_std is not None
        return gaussian_fisher_loss(self.mean, self.log_std)

    def detach(self) -> Distribution:
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return Distribution(d(self.logits), d(self.mean), d(self.log_std))


@dataclass
class PolicySpec:
    """Network options (flat, so that YAML configs and ``--set`` can address them)."""

    arch: Arch = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    activation: Activation = "tanh"
    shared_trunk: bool = False  # MLP only; the CNN trunk is always shared
    cnn_last_filters: int = 32  # the ACKTR paper's last conv layer; Nature DQN uses 64
    log_std_init: float = 0.0
    ortho_init: bool = True


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class NatureCNN(nn.Module):
    """Mnih et al. (2015) encoder on uint8 frames (N, C, 84, 84), scaled to [0, 1]."""

    def __init__(self, channels: int, last_filters: int, features: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, last_filters, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(last_filters * 7 * 7, features),
            nn.ReLU(),
        )
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float() / 255.0)


class ActorCritic(nn.Module):
    """Shared policy-value network; ``forward`` returns ``(Distribution, value)``."""

    def __init__(self, obs_space: gym.Space, action_space: gym.Space, spec: PolicySpec) -> None:
        super().__init__()
        if isinstance(action_space, gym.spaces.Discrete):
            out, self.discrete = int(action_space.n), True
        elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
            out, self.discrete = int(action_space.shape[0]), False
        else:
            raise ValueError(f"unsupported action space {action_space}: use Discrete or a 1-D Box")
        if not isinstance(obs_space, gym.spaces.Box):
            raise ValueError(f"unsupported observation space {obs_space}: use a Box")
        if spec.arch == "cnn" and (len(obs_space.shape) != 3 or obs_space.shape[1:] != (84, 84)):
            raise ValueError(
                f"arch 'cnn' (the Nature CNN) needs (C, 84, 84) images; observations here have "
                f"shape {obs_space.shape} (use arch 'mlp')"
            )
        self.shared: nn.Module | None = None
        self.actor: nn.Module = nn.Identity()
        self.critic: nn.Module = nn.Identity()
        if spec.arch == "cnn":
            cnn = NatureCNN(obs_space.shape[0], spec.cnn_last_filters)
            self.shared, width_pi, width_vf = cnn, cnn.features, cnn.features
        elif spec.arch == "mlp":
            sizes = [int(np.prod(obs_space.shape)), *spec.hidden]
            if spec.shared_trunk:
                self.shared = _mlp(sizes, spec.activation)
            else:
                self.actor, self.critic = _mlp(sizes, spec.activation), _mlp(sizes, spec.activation)
            width_pi = width_vf = sizes[-1]
        else:
            raise ValueError(f"unknown policy arch {spec.arch!r}: use 'mlp' or 'cnn'")
        self.pi = nn.Linear(width_pi, out)
        self.vf = nn.Linear(width_vf, 1)
        self.log_std = (
            None if self.discrete else nn.Parameter(torch.full((out,), spec.log_std_init))
        )
        self.flatten = spec.arch == "mlp"
        if spec.ortho_init:
            self._orthogonal_init()

    def _orthogonal_init(self) -> None:
        """Orthogonal weights, zero biases; gains √2 (trunk), 0.01 (policy), 1 (value) as in
        OpenAI baselines and Stable-Baselines3."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.orthogonal_(module.weight, gain=math.sqrt(2))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.orthogonal_(self.pi.weight, gain=0.01)
        nn.init.orthogonal_(self.vf.weight, gain=1.0)

    def forward(self, obs: Tensor) -> tuple[Distribution, Tensor]:
        x = obs.flatten(1).float() if self.flatten else obs
        if self.shared is not None:
            x = self.shared(x)
        out = self.pi(self.actor(x))
        value = self.vf(self.critic(x)).squeeze(-1)
        if self.discrete:
            return Distribution(logits=out), value
        assert self.log_std is not None
        return Distribution(mean=out, log_std=self.log_std.expand_as(out)), value
