"""Every observation and action space kind, in tiny environments registered here; the networks
chosen for images; the sampled Fisher of the new action heads against the exact Fisher."""

from __future__ import annotations

import itertools
import json
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from agents import distributions as D
from agents.config import load_config
from agents.networks import ActorCritic, NatureCNN, PolicySpec, SmallCNN
from agents.spaces import EncodedBox, encoded_space, observation_parts
from agents.trainer import Trainer
from rl_kfac import KFAC
from rl_kfac.fisher import bernoulli_fisher_loss, multi_categorical_fisher_loss

Box, Discrete = gym.spaces.Box, gym.spaces.Discrete
IMAGE_10 = Box(0, 255, (10, 10, 3), np.uint8)  # channels last, as renders and gridworlds give
OBSERVATIONS = {
    "box-float": Box(-1.0, 1.0, (3,)),
    "box-uint8-vector": Box(0, 255, (6,), np.uint8),  # not an image: 1-D
    "box-bool": Box(0, 1, (4,), np.bool_),
    "discrete": Discrete(5, start=2),
    "discrete-0": Discrete(4),  # SB3 takes no start offset
    "multidiscrete": gym.spaces.MultiDiscrete([3, 4]),
    "multibinary": gym.spaces.MultiBinary(5),
    "tuple": gym.spaces.Tuple([Discrete(3), Box(-1.0, 1.0, (2,))]),
    "dict": gym.spaces.Dict({"pos": Box(-1.0, 1.0, (2,)), "flag": gym.spaces.MultiBinary(2)}),
    "image-small": IMAGE_10,
    "image-chw-40": Box(0, 255, (2, 40, 40), np.uint8),
    "dict-with-image": gym.spaces.Dict({"view": IMAGE_10, "dir": Discrete(4)}),
}
ACTIONS = {
    "discrete": Discrete(3, start=-1),
    "discrete-0": Discrete(3),
    "multidiscrete": gym.spaces.MultiDiscrete([2, 3]),
    "multibinary": gym.spaces.MultiBinary(3),
    "box-2d": Box(-1.0, 1.0, (2, 2)),
}


class SpaceToy(gym.Env):
    """Random observations of the given space; every action is checked against the action space;
    reward 1 when the first action coordinate is at its largest value; episodes of 7 steps."""

    def __init__(self, obs: str = "box-float", act: str = "discrete", length: int = 7) -> None:
        self.observation_space, self.action_space = OBSERVATIONS[obs], ACTIONS[act]
        self.length, self.t = length, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        assert self.action_space.contains(action), f"{action!r} not in {self.action_space}"
        self.t += 1
        first = np.asarray(action).reshape(-1)[0]
        reward = float(first == np.asarray(getattr(self.action_space, "high", first)).max())
        return self.observation_space.sample(), reward, False, self.t >= self.length, {}


def register_toy() -> None:
    if "SpaceToy-v0" not in gym.registry:
        gym.register("SpaceToy-v0", entry_point=SpaceToy)


def short_run(tmp_path, algo: str = "acktr", **env_kwargs) -> Trainer:
    register_toy()
    overrides = [
        f"algo={algo}",
        "env_id=SpaceToy-v0",
        f"env_kwargs={json.dumps(env_kwargs)}",
        "n_envs=2",
        "n_steps=8",
        "total_timesteps=64",
        "checkpoint_interval=32",
        "batch_size=8",
        "log_interval=1",
    ]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", progress=False)
    result = trainer.train()
    assert result.timesteps == 64 and (tmp_path / "run" / "last.pt").exists()
    for p in trainer.policy.parameters():
        assert torch.isfinite(p).all()
    return trainer


@pytest.mark.parametrize("obs", sorted(OBSERVATIONS))
def test_every_observation_space_trains_logs_and_checkpoints(tmp_path, obs):
    trainer = short_run(tmp_path, obs=obs)
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    expected_cnn = {"image-small": SmallCNN, "image-chw-40": NatureCNN}.get(obs)
    cnns = [m for m in trainer.policy.modules() if isinstance(m, (SmallCNN, NatureCNN))]
    if expected_cnn is not None:
        assert [type(m) for m in cnns] == [expected_cnn]
    elif obs == "dict-with-image":
        assert [type(m) for m in cnns] == [SmallCNN]
    else:
        assert cnns == []
    # K-FAC preconditions every layer of every network (no unsupported layer anywhere)
    layers = [m for m in trainer.policy.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(trainer.algo.optimizer.blocks) == len(layers)
    trainer.close()


@pytest.mark.parametrize("act", sorted(ACTIONS))
@pytest.mark.parametrize("algo", ["acktr", "ppo_kfac"])
def test_every_action_space_trains_with_both_agents(tmp_path, act, algo):
    short_run(tmp_path, algo, act=act, obs="dict").close()


def test_flattened_parts_are_gymnasium_flatten_of_each_part():
    """The network cuts the flat vector where gymnasium's own flatten puts each part."""
    space = gym.spaces.Dict(
        {"b": Discrete(3), "a": gym.spaces.Tuple([IMAGE_10, gym.spaces.MultiDiscrete([2, 2])])}
    )
    space.seed(0)
    sample = space.sample()
    flat = gym.spaces.flatten(space, sample)
    encoded = encoded_space(space)
    assert isinstance(encoded, EncodedBox) and encoded.shape == flat.shape
    assert list(space.spaces) == ["a", "b"]  # gymnasium sorts a plain dict's keys
    leaves = [
        (IMAGE_10, sample["a"][0]),
        (space["a"][1], sample["a"][1]),
        (space["b"], sample["b"]),
    ]
    parts = observation_parts(encoded)
    assert [p.image for p in parts] == [True, False, False]
    for part, (sub, value) in zip(parts, leaves):
        np.testing.assert_array_equal(flat[part.start : part.stop], gym.spaces.flatten(sub, value))
    assert parts[0].shape == (10, 10, 3)


def test_image_networks_are_chosen_by_size_or_by_name():
    spec = PolicySpec()
    small = ActorCritic(IMAGE_10, Discrete(2), spec)
    assert isinstance(small.shared, SmallCNN)
    tiny = ActorCritic(Box(0, 255, (3, 3, 1), np.uint8), Discrete(2), spec)  # pads below 5x5
    assert isinstance(tiny.shared, SmallCNN)
    big = ActorCritic(Box(0, 255, (4, 84, 84), np.uint8), Discrete(2), spec)
    assert isinstance(big.shared, NatureCNN)
    assert big.shared.net[7].in_features == 32 * 7 * 7  # the ACKTR paper's 84x84 network
    wide = ActorCritic(Box(0, 255, (64, 64, 3), np.uint8), Discrete(2), PolicySpec(arch="cnn"))
    assert isinstance(wide.shared, NatureCNN)
    named = ActorCritic(
        Box(0, 255, (64, 64, 3), np.uint8), Discrete(2), PolicySpec(arch="small_cnn")
    )
    assert isinstance(named.shared, SmallCNN)
    flat = ActorCritic(IMAGE_10, Discrete(2), PolicySpec(arch="mlp"))
    assert flat.shared is None and flat.encoder is None
    with pytest.raises(ValueError, match="Nature CNN needs images of 36x36"):
        ActorCritic(IMAGE_10, Discrete(2), PolicySpec(arch="nature_cnn"))
    # sizes chosen by the rule keep the linear layer's K-FAC factor A small
    for net in (small, tiny, big, wide):
        linear = next(m for m in net.shared.modules() if isinstance(m, nn.Linear))
        assert linear.in_features <= 32 * 8 * 8
    x = torch.randint(0, 256, (2, 10, 10, 3), dtype=torch.uint8)
    dist, value = small(x)
    assert dist.logits.shape == (2, 2) and value.shape == (2,)


def test_environment_packages_kwargs_and_wrappers_from_the_config(tmp_path, monkeypatch):
    package = tmp_path / "toy_envs_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import gymnasium as gym
            from tests.test_spaces import SpaceToy

            def register():
                gym.register("ToyByFunction-v0", entry_point=SpaceToy)

            gym.register("ToyOnImport-v0", entry_point=SpaceToy)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_envs_pkg", raising=False)
    for env_id, package_entry in [
        ("ToyOnImport-v0", "toy_envs_pkg"),
        ("ToyByFunction-v0", "toy_envs_pkg:register"),
    ]:
        overrides = [
            f"env_id={env_id}",
            f"env_packages=['{package_entry}']",
            "env_kwargs={obs: multidiscrete, length: 50}",
            "wrappers=[{gymnasium.wrappers.TimeLimit: {max_episode_steps: 5}}]",
            "n_envs=2",
            "n_steps=10",
            "total_timesteps=40",
        ]
        run = tmp_path / env_id
        trainer = Trainer(load_config(None, overrides), run, progress=False)
        assert isinstance(trainer.envs.single_observation_space, EncodedBox)  # env_kwargs arrived
        result = trainer.train()
        assert {n for _, _, n in result.episodes} == {5}  # the wrapper cut every episode at 5
        trainer.close()


def jacobian(model: nn.Module, layer: str, fn, x: torch.Tensor) -> torch.Tensor:
    """J of fn(model(x)) w.r.t. vec([W | b]) (column-major)."""
    params = dict(model.named_parameters())
    w_key, b_key = f"{layer}.weight", f"{layer}.bias"

    def f(w, b):
        return fn(functional_call(model, {**params, w_key: w, b_key: b}, (x,))).reshape(-1)

    jw, jb = jacrev(f, argnums=(0, 1))(params[w_key], params[b_key])
    mat = torch.cat([jw.reshape(jw.shape[0], jw.shape[1], -1), jb.unsqueeze(2)], dim=2)
    return mat.transpose(1, 2).reshape(jw.shape[0], -1)


@pytest.mark.parametrize("head", ["multidiscrete", "multibinary"])
def test_new_heads_single_datum_kfac_is_the_exact_fisher(float64, head):
    """One state, the expectation over every joint action instead of one sample: K-FAC's A ⊗ G
    of each layer equals the exact Fisher Jᵀ F_out J, with F_out from torch.distributions."""
    torch.manual_seed(0)
    sizes = [2, 3]
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, sum(sizes) if head == "multidiscrete" else 3)
    )
    opt = KFAC(model, factor_dtype=torch.float64)
    x = torch.randn(1, 4)
    out = model(x)[0].detach()
    if head == "multidiscrete":
        actions = torch.tensor(list(itertools.product(*[range(n) for n in sizes])))
        make = lambda z: D.MultiCategorical(z, sizes)  # noqa: E731
        probs = [torch.distributions.Categorical(logits=z) for z in out.split(sizes)]
        blocks = [torch.diag(c.probs) - torch.outer(c.probs, c.probs) for c in probs]
        f_out = torch.block_diag(*blocks)
    else:
        actions = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
        make = D.Bernoulli
        p = torch.distributions.Bernoulli(logits=out).probs
        f_out = torch.diag(p * (1 - p))
    k = len(actions)
    z = model(x.expand(k, 4))
    weights = (k * make(z.detach()).log_prob(actions).exp()).sqrt()
    with opt.record_statistics():
        (weights * -make(z).log_prob(actions)).mean().backward()
    for name, layer in [("0", model[0]), ("2", model[2])]:
        jac = jacobian(model, name, lambda o: o, x)
        exact = jac.T @ f_out @ jac
        state = opt.state[layer.weight]
        torch.testing.assert_close(torch.kron(state["A"], state["G"]), exact, rtol=1e-6, atol=1e-9)


def test_sampled_fisher_losses_of_the_new_heads_average_to_the_exact_fisher():
    """(N ∂L/∂z)(N ∂L/∂z)ᵀ of the sampled losses, averaged, against F_out by hand."""
    torch.manual_seed(1)
    n = 200_000

    def mc(loss, z0):
        z = z0.expand(n, -1).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(z), z)
        return (n * g).T @ (n * g) / n

    z0 = torch.tensor([0.4, -1.0, 2.0])
    p = z0.sigmoid()
    torch.testing.assert_close(
        mc(bernoulli_fisher_loss, z0), torch.diag(p * (1 - p)), atol=4e-3, rtol=0
    )
    z1 = torch.tensor([0.5, -0.5, 0.3, -1.0, 1.2])
    q, r = z1[:2].softmax(-1), z1[2:].softmax(-1)
    exact = torch.block_diag(torch.diag(q) - torch.outer(q, q), torch.diag(r) - torch.outer(r, r))
    got = mc(lambda z: multi_categorical_fisher_loss(z, [2, 3]), z1)
    torch.testing.assert_close(got, exact, atol=6e-3, rtol=0)


@pytest.mark.parametrize(
    "obs, act",
    [
        ("discrete-0", "multibinary"),
        ("multidiscrete", "multidiscrete"),
        ("multibinary", "box-2d"),
        ("dict", "discrete-0"),
        ("box-bool", "multibinary"),
    ],
)
@pytest.mark.parametrize("algo", ["ACKTR", "PPOKFAC"])
def test_sb3_classes_take_the_spaces_sb3_takes(tmp_path, obs, act, algo):
    from stable_baselines3.common.env_util import make_vec_env

    import rl_kfac.sb3 as sb3

    register_toy()
    envs = make_vec_env("SpaceToy-v0", n_envs=2, env_kwargs={"obs": obs, "act": act})
    policy = "MultiInputPolicy" if obs == "dict" else "MlpPolicy"
    cls = getattr(sb3, algo)
    kwargs = {"n_steps": 8, "batch_size": 16} if algo == "PPOKFAC" else {"n_steps": 8}
    model = cls(policy, envs, seed=0, **kwargs).learn(48)
    assert model.num_timesteps >= 48
    assert len(model.policy.optimizer.blocks) == sum(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.policy.modules()
    )
    model.save(tmp_path / "m.zip")
    loaded = cls.load(tmp_path / "m.zip", env=envs)
    obs0 = envs.reset()
    np.testing.assert_array_equal(
        model.predict(obs0, deterministic=True)[0], loaded.predict(obs0, deterministic=True)[0]
    )


def test_sb3_bernoulli_fisher_loss_averages_to_the_exact_fisher():
    from stable_baselines3.common.distributions import BernoulliDistribution

    from rl_kfac.sb3 import policy_fisher_loss

    torch.manual_seed(2)
    n, z0 = 200_000, torch.tensor([0.4, -1.0, 2.0])
    z = z0.expand(n, -1).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        policy_fisher_loss(BernoulliDistribution(3).proba_distribution(z)), z
    )
    p = z0.sigmoid()
    torch.testing.assert_close((n * g).T @ (n * g) / n, torch.diag(p * (1 - p)), atol=4e-3, rtol=0)


@pytest.mark.parametrize("algo", ["acktr", "ppo_kfac"])
def test_the_third_party_example_config_runs(tmp_path, algo):
    """configs/<algo>/minigrid.yaml: a package's ids (minigrid, a dev extra), its wrapper,
    the small CNN."""
    cfg = load_config(f"configs/{algo}/minigrid.yaml", ["total_timesteps=1", "n_envs=2"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert isinstance(trainer.policy.shared, SmallCNN)
    assert trainer.train().timesteps == cfg.n_envs * cfg.n_steps
    trainer.close()
