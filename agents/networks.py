"""Policy-value networks for any supported observation and action space.

Trunks: an MLP on the flattened observation; a CNN for image observations, chosen by image size
(the Nature CNN of Mnih et al. 2015 from 36x36 up, a small 3x3-kernel net below, as gridworlds
need); for a Tuple or Dict with images, a CNN per image part and the other parts flattened,
side by side, under the MLP. Heads: one per action space (:mod:`agents.distributions`).
"""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import torch
from torch import Tensor, nn

from agents.distributions import ActionHead, Distribution
from agents.spaces import Part, image_chw, observation_parts

# auto: a CNN for images (by size), an MLP otherwise; cnn: a CNN by size; nature_cnn, small_cnn:
# that CNN for every image part; mlp: everything flattened
Arch = Literal["auto", "mlp", "cnn", "nature_cnn", "small_cnn"]
NATURE_MIN_SIDE = 36  # the Nature CNN's 8/4, 4/2, 3/1 convolutions need 36x36 at least
Activation = Literal["tanh", "relu"]
Recurrent = Literal["none", "lstm", "gru"]  # a recurrent core between the encoder and the MLPs
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass
class PolicySpec:
    """Network options (flat, so that YAML configs and ``--set`` can address them)."""

    arch: Arch = "auto"
    hidden: tuple[int, ...] = (64, 64)
    activation: Activation = "tanh"
    shared_trunk: bool = False  # MLP only; the CNN trunk is always shared
    cnn_last_filters: int = 32  # the ACKTR paper's last conv layer; Nature DQN uses 64
    normalize_images: bool = True  # divide uint8 images by 255 (SB3's option of that name)
    log_std_init: float = 0.0
    ortho_init: bool = True
    recurrent: Recurrent = "none"
    hidden_size: int = 64  # of the recurrent core
    # False: the critic gets a recurrent core of its own (sb3-contrib's enable_critic_lstm), so
    # the value loss no longer shapes the memory the policy reads
    shared_core: bool = True

    def __post_init__(self) -> None:
        if not self.shared_core and (self.recurrent == "none" or self.shared_trunk):
            raise ValueError(
                "shared_core false (a critic recurrent core of its own) needs recurrent lstm or "
                "gru and shared_trunk false"
            )


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """A CNN on uint8 images (N, C, H, W) or (N, H, W, C), scaled to [0, 1] unless ``scale``
    is off (grids of small integer codes, such as MiniGrid's, are not pixels); ``features``
    outputs. ``net`` holds the layers (the Nature CNN's keep the indices of earlier versions)."""

    features: int
    net: nn.Sequential

    def __init__(self, shape: tuple[int, ...], scale: bool = True) -> None:
        super().__init__()
        self.channels_last = image_chw(shape) != tuple(shape)
        self.scale = 1.0 / 255.0 if scale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() * self.scale
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.net(x)

    def _finish(self, convs: list[nn.Module], chw: tuple[int, int, int], features: int) -> None:
        """Flatten, then a ReLU linear layer of ``features`` units (its width measured here)."""
        with torch.no_grad():
            flat = nn.Sequential(*convs)(torch.zeros(1, *chw)).numel()
        self.net = nn.Sequential(*convs, nn.Flatten(), nn.Linear(flat, features), nn.ReLU())
        self.features = features


class NatureCNN(ImageEncoder):
    """Mnih et al. (2015): 32 8x8/4, 64 4/2 and ``last_filters`` 3/1 convolutions, 512 units."""

    def __init__(
        self, shape: tuple[int, ...], last_filters: int, features: int = 512, scale: bool = True
    ) -> None:
        super().__init__(shape, scale)
        c, h, w = image_chw(shape)
        if min(h, w) < NATURE_MIN_SIDE:
            raise ValueError(
                f"the Nature CNN needs images of {NATURE_MIN_SIDE}x{NATURE_MIN_SIDE} or more, got "
                f"{h}x{w} (arch 'small_cnn' or 'cnn' takes any size)"
            )
        convs: list[nn.Module] = [
            nn.Conv2d(c, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, last_filters, 3, stride=1),
            nn.ReLU(),
        ]
        self._finish(convs, (c, h, w), features)


class SmallCNN(ImageEncoder):
    """Two 3x3 convolutions (16 and 32 filters) for small images such as gridworld views, then
    256 units. A convolution strides 2 where its output would exceed 8x8 and pads 1 where its
    input is under 5 wide, so the linear layer's input (and its K-FAC factor A) stays small."""

    def __init__(self, shape: tuple[int, ...], features: int = 256, scale: bool = True) -> None:
        super().__init__(shape, scale)
        c, h, w = image_chw(shape)
        convs: list[nn.Module] = []
        side, channels = min(h, w), c
        for filters in (16, 32):
            pad = 1 if side < 5 else 0
            stride = 2 if side + 2 * pad - 2 > 8 else 1
            convs += [nn.Conv2d(channels, filters, 3, stride=stride, padding=pad), nn.ReLU()]
            side, channels = (side + 2 * pad - 3) // stride + 1, filters
        self._finish(convs, (c, h, w), features)


def image_encoder(shape: tuple[int, ...], spec: PolicySpec) -> ImageEncoder:
    """The CNN ``spec.arch`` asks for, or the one for the image's size."""
    _, h, w = image_chw(shape)
    arch = spec.arch
    nature = arch == "nature_cnn" or (arch in ("auto", "cnn") and min(h, w) >= NATURE_MIN_SIDE)
    scale = spec.normalize_images
    if nature:
        return NatureCNN(shape, spec.cnn_last_filters, scale=scale)
    return SmallCNN(shape, scale=scale)


class MixedEncoder(nn.Module):
    """A flattened Tuple/Dict observation with image parts: each image through its own CNN,
    the other parts as they are, concatenated."""

    def __init__(self, parts: list[Part], spec: PolicySpec) -> None:
        super().__init__()
        self.parts = parts
        self.cnns = nn.ModuleList(image_encoder(p.shape, spec) for p in parts if p.image)
        cnn_features = [cnn.features for cnn in self.cnns if isinstance(cnn, ImageEncoder)]
        self.features = sum(p.stop - p.start for p in parts if not p.image) + sum(cnn_features)

    def forward(self, x: Tensor) -> Tensor:
        cnns = iter(self.cnns)
        out = []
        for p in self.parts:
            part = x[:, p.start : p.stop]
            out.append(next(cnns)(part.reshape(-1, *p.shape)) if p.image else part.float())
        return torch.cat(out, dim=-1)


class ActorCritic(nn.Module):
    """Shared policy-value network; ``forward`` returns ``(Distribution, value)``."""

    def __init__(self, obs_space: gym.Space, action_space: gym.Space, spec: PolicySpec) -> None:
        super().__init__()
        if spec.arch not in typing.get_args(Arch):
            raise ValueError(
                f"unknown policy arch {spec.arch!r}: use one of {typing.get_args(Arch)}"
            )
        self.head = ActionHead(action_space)
        parts = observation_parts(obs_space)  # one-line errors for unsupported spaces
        images = [p for p in parts if p.image]
        if spec.arch in ("cnn", "nature_cnn", "small_cnn") and not images:
            raise ValueError(
                f"arch {spec.arch!r} needs image observations (3-D uint8 Box, bounds 0-255); "
                f"{obs_space} has none (use arch 'auto' or 'mlp')"
            )
        if spec.recurrent not in typing.get_args(Recurrent):
            raise ValueError(f"recurrent must be one of {typing.get_args(Recurrent)}")
        self.shared: nn.Module | None = None
        self.actor: nn.Module = nn.Identity()
        self.critic: nn.Module = nn.Identity()
        self.encoder: nn.Module | None = None
        self.rnn: nn.LSTM | nn.GRU | None = None
        self.critic_rnn: nn.LSTM | nn.GRU | None = None  # shared_core false only
        self.flatten = True
        self.cnn_trunk = spec.arch != "mlp" and len(parts) == 1 and bool(images)
        if self.cnn_trunk:  # one image: CNN, (the recurrent core,) then the heads
            cnn = image_encoder(images[0].shape, spec)
            self.shared, self.flatten = cnn, False
            width_pi = width_vf = self._recurrent_core(cnn.features, spec)
        else:
            width = parts[-1].stop  # the flattened observation
            if spec.arch != "mlp" and images:
                self.encoder = MixedEncoder(parts, spec)
                width = self.encoder.features
            sizes = [self._recurrent_core(width, spec), *spec.hidden]
            if spec.shared_trunk:
                self.shared = _mlp(sizes, spec.activation)
            else:
                self.actor, self.critic = _mlp(sizes, spec.activation), _mlp(sizes, spec.activation)
            width_pi = width_vf = sizes[-1]
        self.pi = nn.Linear(width_pi, self.head.width)
        self.vf = nn.Linear(width_vf, 1)
        self.log_std = (
            nn.Parameter(torch.full((self.head.width,), spec.log_std_init))
            if self.head.gaussian
            else None
        )
        if spec.ortho_init:
            self._orthogonal_init()

    def _recurrent_core(self, width: int, spec: PolicySpec) -> int:
        """Add the LSTM/GRU the spec asks for on ``width`` features; the width after it."""
        if spec.recurrent == "none":
            return width
        kind = nn.LSTM if spec.recurrent == "lstm" else nn.GRU
        self.rnn = kind(width, spec.hidden_size)
        if not spec.shared_core:
            self.critic_rnn = kind(width, spec.hidden_size)
        return spec.hidden_size

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

    @property
    def recurrent(self) -> bool:
        return self.rnn is not None

    def value_parameters(self) -> list[nn.Parameter]:
        """The parameters only the value depends on: the critic's recurrent core (if it has its
        own), the critic MLP and the value head (the value head alone when the trunk is shared)."""
        core = [] if self.critic_rnn is None else list(self.critic_rnn.parameters())
        return [*core, *self.critic.parameters(), *self.vf.parameters()]

    def forward(self, obs: Tensor) -> tuple[Distribution, Tensor]:
        """``(Distribution, value)`` of a feed-forward policy (a recurrent one: :meth:`step`)."""
        if self.rnn is not None:
            raise ValueError("a recurrent policy takes step(obs, state, starts) or sequence(...)")
        x = self._encode(obs)
        return self._heads(x, x)

    def _encode(self, obs: Tensor) -> Tensor:
        x = obs.flatten(1) if self.flatten else obs
        if self.encoder is not None:
            x = self.encoder(x)
        elif self.flatten:
            x = x.float()
        if self.cnn_trunk:
            assert self.shared is not None
            x = self.shared(x)
        return x

    def _heads(self, x_pi: Tensor, x_vf: Tensor) -> tuple[Distribution, Tensor]:
        """The heads on the actor's and the critic's features (the same tensor unless the
        critic has a recurrent core of its own)."""
        if self.shared is not None and not self.cnn_trunk:  # the MLP trunk: x_vf is x_pi
            x_pi = x_vf = self.shared(x_pi)
        out = self.pi(self.actor(x_pi))
        value = self.vf(self.critic(x_vf)).squeeze(-1)
        return self.head.distribution(out, self.log_std), value

    # -- recurrent policies: the state is one tensor (k, cores·layers, n, hidden), k = 2 for
    # an LSTM's (h, c); the actor's layers first, then the critic's own core's (if any) --
    def initial_state(self, n: int) -> Tensor:
        """The state of ``n`` new episodes (zeros; empty for a feed-forward policy)."""
        if self.rnn is None:
            return self.pi.weight.new_zeros(0)
        k = 2 if isinstance(self.rnn, nn.LSTM) else 1
        layers = self.rnn.num_layers * (1 if self.critic_rnn is None else 2)
        return self.pi.weight.new_zeros(k, layers, n, self.rnn.hidden_size)

    def _core(self, x: Tensor, state: Tensor, starts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The recurrent core(s) over ``x`` (one step ``(n, features)``, or steps ``(T, n,
        features)`` without episode starts after the first): ``(actor features, critic
        features, new state)``. Episodes that start at the first step begin from zeros."""
        assert self.rnn is not None
        state = state * (~starts).to(state.dtype)[None, None, :, None]
        one_step = x.dim() == 2
        seq = x.unsqueeze(0) if one_step else x
        layers = self.rnn.num_layers
        outs, states = [], []
        cores = [self.rnn] if self.critic_rnn is None else [self.rnn, self.critic_rnn]
        for i, rnn in enumerate(cores):
            part = state[:, i * layers : (i + 1) * layers]
            hx = (part[0], part[1]) if isinstance(rnn, nn.LSTM) else part[0]
            out, new = rnn(seq, hx)
            outs.append(out[0] if one_step else out)
            states.append(torch.stack(new) if isinstance(new, tuple) else new.unsqueeze(0))
        return outs[0], outs[-1], torch.cat(states, dim=1)

    def step(
        self, obs: Tensor, state: Tensor, starts: Tensor
    ) -> tuple[Distribution, Tensor, Tensor]:
        """One step of ``n`` environments: ``(Distribution, value, next state)``."""
        x_pi, x_vf, state = self._core(self._encode(obs), state, starts)
        dist, value = self._heads(x_pi, x_vf)
        return dist, value, state

    def sequence(self, obs: Tensor, state: Tensor, starts: Tensor) -> tuple[Distribution, Tensor]:
        """``T`` steps of ``n`` environments from ``state``: ``obs`` time-major ``(T·n, ...)``,
        ``starts`` ``(T, n)`` flags of the steps that begin an episode; outputs time-major,
        back-propagating through every step."""
        steps, n = starts.shape
        x = self._encode(obs)
        x = x.reshape(steps, n, x.shape[-1])
        # one fused call per stretch of steps in which no episode starts (after the first step)
        inner = (starts[1:].any(dim=1).nonzero().flatten() + 1).tolist()  # one host read
        cuts = [0, *inner, steps]
        outs_pi, outs_vf = [], []  # outs_vf: a critic core of its own only
        for a, b in itertools.pairwise(cuts):
            x_pi, x_vf, state = self._core(x[a:b], state, starts[a])
            outs_pi.append(x_pi.reshape(-1, x_pi.shape[-1]))
            if x_vf is not x_pi:
                outs_vf.append(x_vf.reshape(-1, x_vf.shape[-1]))
        x_pi = torch.cat(outs_pi)
        return self._heads(x_pi, torch.cat(outs_vf) if outs_vf else x_pi)
