"""Public objects say what they are (no default ``<... object at 0x...>`` repr)."""

from __future__ import annotations

from agents.config import load_config
from agents.trainer import Trainer


def test_public_objects_have_a_repr(tmp_path):
    trainer = Trainer(load_config("configs/acktr/cartpole.yaml"), tmp_path, progress=False)
    opt = trainer.algo.optimizer
    objects = [
        trainer,
        trainer.algo,
        trainer.collector,
        trainer.normalizer,
        opt,
        opt.diagnostics,
        *opt.blocks,
        opt._capture,
        opt._factors,
        opt._curvature,
    ]
    for obj in objects:
        assert "object at 0x" not in repr(obj), type(obj)
    assert "kl_clip=0.01" in repr(opt) and "blocks=6" in repr(opt)
    trainer.close()
