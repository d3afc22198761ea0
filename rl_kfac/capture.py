"""Finding the supported layers and capturing their inputs and output gradients.

A forward hook on each layer attaches a *tensor* hook to the layer's output (not a module
backward hook, which breaks when the next op is an in-place ReLU). The tensor hook fires during
every backward pass, but only keeps ``(input, output-grad)`` while ``recording`` is on, i.e.
inside ``KFAC.record_statistics()``. Forward passes without autograd (rollouts under
``torch.no_grad()``) register nothing.

Hooks are small picklable objects rather than closures, so ``copy.deepcopy((model, optimizer))``
and pickling give a copy whose hooks feed the copied optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rl_kfac.blocks import Block, ConvApprox, is_supported, make_block

Record = tuple[Block, Tensor, Tensor]


class LoggedCall(NamedTuple):
    """One hooked forward call, kept until the next statistics update."""

    block: Block
    is_root: bool  # the layer's input needs no gradient: back-propagation can stop here
    output: Tensor
    version: int  # output._version at the call; a later in-place op changes it


class _GradHook:
    def __init__(self, capture: StatisticsCapture, block: Block, inputs: Tensor) -> None:
        self.capture, self.block, self.inputs = capture, block, inputs

    def __call__(self, grad: Tensor) -> None:
        cap = self.capture
        if (cap.recording or cap.empirical) and (cap.only is None or self.block in cap.only):
            cap.records.append((self.block, self.inputs, grad))


class _ForwardHook:
    def __init__(self, capture: StatisticsCapture, block: Block) -> None:
        self.capture, self.block = capture, block

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        cap = self.capture
        if (
            cap.armed
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and args
            and isinstance(args[0], Tensor)
        ):
            output.register_hook(_GradHook(cap, self.block, args[0]))
            cap.forward_log.append(
                LoggedCall(self.block, not args[0].requires_grad, output, output._version)
            )


class _DiscoveryHook:
    """Global forward hook: the first call of a layer owning our parameters makes its block."""

    def __init__(self, capture: StatisticsCapture) -> None:
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        cap = self.capture
        if module in cap.blocks or not is_supported(module):
            return
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in cap.wanted:
            return
        hook = cap.add_module(module, f"{type(module).__name__.lower()}{len(cap.blocks)}")
        if hook is not None:
            hook(module, args, output)  # this call happened before the per-module hook existed


class StatisticsCapture:
    """Owns the hooks and the records taken during one ``record_statistics()`` context."""

    def __init__(self, conv_approx: ConvApprox) -> None:
        self.conv_approx: ConvApprox = conv_approx
        self.blocks: dict[nn.Module, Block] = {}
        self.unsupported: list[str] = []
        self._wanted_params: list[Tensor] = []  # parameters whose owning layer is still unknown
        self.wanted: set[int] = set()  # their ids (rebuilt after a copy: ids change)
        self.armed = True
        self.recording = False
        self.empirical = False  # record from every backward pass (the empirical Fisher)
        self.records: list[Record] = []
        self.only: set[Block] | None = None  # restricts recording to these blocks
        self.forward_log: list[LoggedCall] = []
        self._handles: list[RemovableHandle] = []
        self._discovery: RemovableHandle | None = None

    # -- finding layers -------------------------------------------------------------------------
    def add_module(self, module: nn.Module, name: str) -> _ForwardHook | None:
        """Track ``module`` if its weight is trainable; returns its forward hook."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.requires_grad:
            return None
        bias = getattr(module, "bias", None)
        has_bias = isinstance(bias, Tensor) and bias.requires_grad
        try:
            block = make_block(module, name, has_bias, self.conv_approx)
        except ValueError as err:
            self.unsupported.append(str(err))
            self.wanted.discard(id(weight))
            return None
        self.blocks[module] = block
        for p in block.params:
            self.wanted.discard(id(p))
        hook = _ForwardHook(self, block)
        self._handles.append(module.register_forward_hook(hook))
        return hook

    def add_model(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if is_supported(module):
                self.add_module(module, name or type(module).__name__.lower())

    def start_discovery(self, params: Iterable[Tensor]) -> None:
        """Find owners of ``params`` on the next forward passes (a temporary global hook)."""
        self._wanted_params = list(params)
        self.wanted = {id(p) for p in self._wanted_params}
        if self._discovery is None:
            self._discovery = nn.modules.module.register_module_forward_hook(_DiscoveryHook(self))

    def end_discovery(self) -> None:
        self._wanted_params, self.wanted = [], set()
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None

    @property
    def discovering(self) -> bool:
        return self._discovery is not None

    def remove(self) -> None:
        """Detach every hook from the model."""
        self.end_discovery()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take_records(self) -> list[Record]:
        records, self.records = self.records, []
        return records

    # -- pickling: the global hook handle points into torch's module-level registry ------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_discovery"] = self._discovery is not None
        state["wanted"] = None
        state["records"] = []
        state["forward_log"] = []
        state["recording"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        discovering = state.pop("_discovery")
        self.__dict__.update(state)
        self._discovery = None
        found = {id(p) for b in self.blocks.values() for p in b.params}
        self.wanted = {id(p) for p in self._wanted_params} - found
        if discovering:
            self._discovery = nn.modules.module.register_module_forward_hook(_DiscoveryHook(self))
