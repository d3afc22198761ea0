"""Action distributions, one per Gymnasium action space, and the head size each one needs.

- ``Discrete``: categorical over logits;
- ``MultiDiscrete``: independent categoricals, their logits side by side;
- ``MultiBinary``: independent Bernoullis over logits;
- ``Box``: diagonal Gaussian (the mean from the network, a state-independent log-std).

Box actions are sampled from the unbounded Gaussian (log-probabilities and the Fisher refer to
that sample) and clipped to the bounds only when sent to the environment, as Stable-Baselines3
does. Each distribution's ``fisher_loss`` is the sampled-Fisher loss of :mod:`rl_kfac.fisher`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rl_kfac.fisher import (
    bernoulli_fisher_loss,
    categorical_fisher_loss,
    gaussian_fisher_loss,
    multi_categorical_fisher_loss,
    sample_categorical,
)

ACTION_SPACES = "Discrete, MultiDiscrete, MultiBinary or a Box"


class Distribution(ABC):
    """A batch of action distributions."""

    @abstractmethod
    def sample(self) -> Tensor: ...

    @abstractmethod
    def mode(self) -> Tensor: ...

    @abstractmethod
    def log_prob(self, actions: Tensor) -> Tensor:
        """Per-sample log-likelihood (summed over action dimensions)."""

    @abstractmethod
    def entropy(self) -> Tensor: ...

    @abstractmethod
    def kl(self, other: Distribution) -> Tensor:
        """KL(self ‖ other) per sample, ``other`` of the same kind."""

    @abstractmethod
    def fisher_loss(self) -> Tensor:
        """Mean NLL of actions sampled from this distribution (see ``rl_kfac.fisher``)."""

    @abstractmethod
    def detach(self) -> Distribution: ...

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in shapes.items())})"


class Categorical(Distribution):
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def sample(self) -> Tensor:
        return sample_categorical(self.logits)

    def mode(self) -> Tensor:
        return self.logits.argmax(dim=-1)

    def log_prob(self, actions: Tensor) -> Tensor:
        logp = self.logits.log_softmax(dim=-1)
        return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        logp = self.logits.log_softmax(dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)

    def kl(self, other: Distribution) -> Tensor:
        assert isinstance(other, Categorical)
        logp, logq = self.logits.log_softmax(-1), other.logits.log_softmax(-1)
        return (logp.exp() * (logp - logq)).sum(dim=-1)

    def fisher_loss(self) -> Tensor:
        return categorical_fisher_loss(self.logits)

    def detach(self) -> Categorical:
        return Categorical(self.logits.detach())


class MultiCategorical(Distribution):
    """Independent categoricals; ``logits[..., offsets]`` of sub-action ``i`` has ``sizes[i]``."""

    def __init__(self, logits: Tensor, sizes: list[int]) -> None:
        self.logits, self.sizes = logits, sizes

    def _parts(self) -> list[Categorical]:
        return [Categorical(z) for z in self.logits.split(self.sizes, dim=-1)]

    def sample(self) -> Tensor:
        return torch.stack([p.sample() for p in self._parts()], dim=-1)

    def mode(self) -> Tensor:
        return torch.stack([p.mode() for p in self._parts()], dim=-1)

    def log_prob(self, actions: Tensor) -> Tensor:
        parts = zip(self._parts(), actions.unbind(-1))
        return torch.stack([p.log_prob(a) for p, a in parts], dim=-1).sum(-1)

    def entropy(self) -> Tensor:
        return torch.stack([p.entropy() for p in self._parts()], dim=-1).sum(-1)

    def kl(self, other: Distribution) -> Tensor:
        assert isinstance(other, MultiCategorical)
        pairs = zip(self._parts(), other._parts())
        return torch.stack([p.kl(q) for p, q in pairs], dim=-1).sum(-1)

    def fisher_loss(self) -> Tensor:
        return multi_categorical_fisher_loss(self.logits, self.sizes)

    def detach(self) -> MultiCategorical:
        return MultiCategorical(self.logits.detach(), self.sizes)


class Bernoulli(Distribution):
    """Independent bits, ``P(b_i = 1) = σ(logits_i)``; actions are 0./1. floats."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def sample(self) -> Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits.detach()))

    def mode(self) -> Tensor:
        return (self.logits > 0).to(self.logits.dtype)

    def log_prob(self, actions: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(
            self.logits, actions.to(self.logits.dtype), reduction="none"
        )
        return -nll.sum(-1)

    def entropy(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        nll = F.binary_cross_entropy_with_logits(self.logits, p, reduction="none")
        return nll.sum(-1)  # H(p) = cross-entropy of p with itself

    def kl(self, other: Distribution) -> Tensor:
        assert isinstance(other, Bernoulli)
        p = torch.sigmoid(self.logits)
        # KL = Σ p(log p − log q) + (1−p)(log(1−p) − log(1−q)), in log-sigmoid form
        log_p, log_not_p = F.logsigmoid(self.logits), F.logsigmoid(-self.logits)
        log_q, log_not_q = F.logsigmoid(other.logits), F.logsigmoid(-other.logits)
        return (p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)).sum(-1)

    def fisher_loss(self) -> Tensor:
        return bernoulli_fisher_loss(self.logits)

    def detach(self) -> Bernoulli:
        return Bernoulli(self.logits.detach())


class DiagGaussian(Distribution):
    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean, self.log_std = mean, log_std

    def sample(self) -> Tensor:
        return self.mean + self.log_std.exp() * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        return self.mean

    def log_prob(self, actions: Tensor) -> Tensor:
        z = (actions - self.mean) / self.log_std.exp()
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(dim=-1)

    def entropy(self) -> Tensor:
        per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + self.log_std
        return per_dim.sum(dim=-1).expand(self.mean.shape[:-1])

    def kl(self, other: Distribution) -> Tensor:
        assert isinstance(other, DiagGaussian)
        var_ratio = (2 * (self.log_std - other.log_std)).exp()
        t = ((self.mean - other.mean) / other.log_std.exp()).pow(2)
        return 0.5 * (var_ratio + t - 1 - var_ratio.log()).sum(dim=-1)

    def fisher_loss(self) -> Tensor:
        return gaussian_fisher_loss(self.mean, self.log_std)

    def detach(self) -> DiagGaussian:
        return DiagGaussian(self.mean.detach(), self.log_std.detach())


class ActionHead:
    """What a policy needs to know about its action space: the head's output width, how that
    output becomes a :class:`Distribution`, and how sampled actions are stored (``shape``: ``()``
    for Discrete, else the flattened action) and sent to the environments."""

    def __init__(self, space: gym.Space) -> None:
        self.space = space
        self.sizes: list[int] | None = None  # MultiDiscrete: the sub-actions' sizes
        self.shape: tuple[int, ...]
        self.gaussian = isinstance(space, gym.spaces.Box)
        if isinstance(space, gym.spaces.Discrete):
            self.width, self.shape, self.dtype = int(space.n), (), torch.long
        elif isinstance(space, gym.spaces.MultiDiscrete):
            self.sizes = [int(n) for n in np.asarray(space.nvec).reshape(-1)]
            self.width, self.shape, self.dtype = sum(self.sizes), (len(self.sizes),), torch.long
        elif isinstance(space, (gym.spaces.MultiBinary, gym.spaces.Box)) and space.shape:
            size = int(np.prod(space.shape))
            self.width, self.shape, self.dtype = size, (size,), torch.float32
        else:
            raise ValueError(f"unsupported action space {space}: use {ACTION_SPACES}")
        if self.width < 1:
            raise ValueError(f"action space {space} has no actions")

    def __repr__(self) -> str:
        return f"ActionHead({self.space}, width={self.width})"

    def distribution(self, out: Tensor, log_std: Tensor | None = None) -> Distribution:
        """The distribution from the head's output ``(N, width)`` (and the log-std for a Box)."""
        if self.gaussian:
            assert log_std is not None
            return DiagGaussian(out, log_std.expand_as(out))
        if self.sizes is not None:
            return MultiCategorical(out, self.sizes)
        if isinstance(self.space, gym.spaces.MultiBinary):
            return Bernoulli(out)
        return Categorical(out)

    def to_env(self, action: Tensor) -> np.ndarray:
        """Sampled actions as the environments take them: in the space's shape and dtype, Box
        actions clipped to the bounds, integer actions shifted by the space's ``start``."""
        space = self.space
        x = action.cpu().numpy()
        if isinstance(space, gym.spaces.Discrete):
            return (x + int(space.start)).astype(space.dtype)
        x = x.reshape(-1, *space.shape)  # type: ignore[misc]
        if isinstance(space, gym.spaces.Box):
            return np.clip(x, space.low, space.high).astype(space.dtype)
        if isinstance(space, gym.spaces.MultiDiscrete):
            return (x + space.start).astype(space.dtype)
        return x.astype(space.dtype)
