"""Finding the supported layers and capturing their inputs and output gradients.

First stage of the K-FAC pipeline (capture → statistics → curvature → step). A forward hook on
each layer attaches a *tensor* hook to the layer's output (not a module backward hook, which
breaks when the next op is an in-place ReLU). Forward hooks act only while the capture is
*armed* (statistics are due this step); the tensor hook fires during every backward pass but
keeps a :class:`Record` only inside :meth:`StatisticsCapture.recording` (or always, for the
empirical Fisher). Forward passes without autograd (rollouts under ``torch.no_grad()``) register
nothing.

Hooks are small picklable objects rather than closures, so ``copy.deepcopy((model, optimizer))``
and pickling give a copy whose hooks feed the copied optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rl_kfac.blocks import Block, ConvApprox, is_supported, make_block
from rl_kfac.recurrent import (
    RECURRENT_LAYERS,
    RecurrentApprox,
    RecurrentBlock,
    check_recurrent,
    recurrent_blocks,
    unrolled_forward,
)


class Record(NamedTuple):
    """One backward pass through one layer call: what its Kronecker factors are built from."""

    block: Block
    inputs: Tensor  # the layer's input a
    grad_output: Tensor  # ∂L/∂s at the layer's output s
    call: int = -1  # which forward call of a recurrent layer (its steps join across calls)


class LoggedCall(NamedTuple):
    """One hooked forward call, kept until the next statistics update."""

    block: Block
    is_root: bool  # the layer's input needs no gradient: back-propagation can stop here
    output: Tensor
    version: int  # output._version at the call; a later in-place op changes it


class _GradHook:
    def __init__(
        self, capture: StatisticsCapture, block: Block, inputs: Tensor, call: int = -1
    ) -> None:
        self.capture, self.block, self.inputs, self.call = capture, block, inputs, call

    def __call__(self, grad: Tensor) -> None:
        self.capture._on_backward(Record(self.block, self.inputs, grad, self.call))


class _ForwardHook:
    def __init__(self, capture: StatisticsCapture, block: Block) -> None:
        self.capture, self.block = capture, block

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.capture._on_forward(self.block, args, output)


class _RecurrentHook:
    """While statistics are due, replaces a recurrent layer's output by its step-by-step rerun
    (:mod:`rl_kfac.recurrent`), whose probes record the per-step gate gradients."""

    def __init__(self, capture: StatisticsCapture) -> None:
        self.capture = capture

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        cap = self.capture
        blocks = cap.recurrent.get(module)
        if not (cap.armed and torch.is_grad_enabled() and blocks):
            return None
        cap._recurrent_calls += 1
        probe = functools.partial(cap._on_probe, call=cap._recurrent_calls)
        return unrolled_forward(module, args, kwargs, probe, blocks)


class _DiscoveryHook:
    """Global forward hook: the first call of a layer owning our parameters makes its block."""

    def __init__(self, capture: StatisticsCapture) -> None:
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        cap = self.capture
        if module in cap.blocks or module in cap.recurrent:
            return
        if isinstance(module, RECURRENT_LAYERS):
            if any(id(p) in cap.wanted for p in module.parameters(recurse=False)):
                # from the next call on: this one's arguments may have been passed by keyword,
                # which a global hook does not see, so it is not rerun
                cap.add_module(module, f"{type(module).__name__.lower()}{len(cap.recurrent)}")
            return
        if not is_supported(module):
            cap.note_unsupported(module, f"{type(module).__name__.lower()}{len(cap.unsupported)}")
            return
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in cap.wanted:
            return
        hook = cap.add_module(module, f"{type(module).__name__.lower()}{len(cap.blocks)}")
        if hook is not None:
            hook(module, args, output)  # this call happened before the per-module hook existed


class StatisticsCapture:
    """Owns the hooks, and the records and forward calls logged since they were last taken.

    Args:
        conv_approx: how blocks of ``nn.Conv2d`` layers turn positions into rows.
        recurrent_approx: the same for the steps of recurrent layers.
        empirical: record from every backward pass (the empirical Fisher), not only inside
            :meth:`recording`.
    """

    def __init__(
        self,
        conv_approx: ConvApprox,
        empirical: bool = False,
        recurrent_approx: RecurrentApprox = "expand",
    ) -> None:
        self.conv_approx: ConvApprox = conv_approx
        self.recurrent_approx: RecurrentApprox = recurrent_approx
        self.empirical = empirical
        self.blocks: dict[nn.Module, Block] = {}
        # recurrent layers: their blocks by key ("ih_l0", "hh_l0", ...)
        self.recurrent: dict[nn.Module, dict[str, RecurrentBlock]] = {}
        self._recurrent_calls = 0  # forward calls of recurrent layers rerun so far
        self.unsupported: list[str] = []
        self._wanted_params: list[Tensor] = []  # parameters whose owning layer is still unknown
        self.wanted: set[int] = set()  # their ids (rebuilt after a copy: ids change)
        self._armed = True
        self._recording = False
        self._records: list[Record] = []
        self._only: set[Block] | None = None  # restricts recording to these blocks
        self._forward_log: list[LoggedCall] = []
        self._handles: list[RemovableHandle] = []
        self._discovery: RemovableHandle | None = None

    # -- what the hooks report ------------------------------------------------------------------
    def _on_forward(self, block: Block, args: tuple[Any, ...], output: Any) -> None:
        if (
            self._armed
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and args
            and isinstance(args[0], Tensor)
        ):
            output.register_hook(_GradHook(self, block, args[0]))
            self._forward_log.append(
                LoggedCall(block, not args[0].requires_grad, output, output._version)
            )

    def _on_probe(self, block: Block, inputs: Tensor, probe: Tensor, call: int = -1) -> None:
        """A recurrent block's probe: its gradient is the block's per-step output gradient. A
        probe is a leaf, so the Fisher backward pass must ask for it: it is logged as a root.
        The hook keeps the inputs detached: the hidden states depend on the probe, and a hook
        holding them would tie the graph to itself (a cycle through autograd's C++ graph that
        Python's collector cannot free)."""
        probe.register_hook(_GradHook(self, block, inputs.detach(), call))
        self._forward_log.append(LoggedCall(block, True, probe, probe._version))

    def _on_backward(self, record: Record) -> None:
        if (self._recording or self.empirical) and (
            self._only is None or record.block in self._only
        ):
            self._records.append(record)

    # -- what the optimizer asks ----------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """Whether forward passes are logged and hooked (statistics are due)."""
        return self._armed

    def arm(self, due: bool) -> None:
        """Log and hook the coming forward passes or not; drops the calls logged so far."""
        self._armed = due
        self._forward_log.clear()

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep the records of the backward passes run inside; the forward log is spent after."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            self._forward_log.clear()

    @contextmanager
    def restricted_to(self, blocks: Iterable[Block]) -> Iterator[None]:
        """Record only ``blocks`` inside (a second backward pass must not count others twice)."""
        self._only = set(blocks)
        try:
            yield
        finally:
            self._only = None

    def take_records(self) -> list[Record]:
        records, self._records = self._records, []
        return records

    def recorded_blocks(self) -> set[Block]:
        """Blocks with at least one record not yet taken."""
        return {r.block for r in self._records}

    def take_forward_log(self) -> list[LoggedCall]:
        log, self._forward_log = self._forward_log, []
        return log

    def all_blocks(self) -> list[Block]:
        """Every block found: single-weight layers, then the weights of recurrent layers."""
        return [*self.blocks.values(), *(b for bs in self.recurrent.values() for b in bs.values())]

    # -- finding layers -------------------------------------------------------------------------
    def add_recurrent(self, module: nn.Module, name: str) -> None:
        """Track the trainable weights of a recurrent layer (``ValueError`` for a variant whose
        steps cannot be rerun: never a silent plain gradient)."""
        check_recurrent(module, name)

        def trainable(p: Tensor) -> bool:
            return p.requires_grad and (not self.discovering or id(p) in self.wanted)

        blocks = recurrent_blocks(module, name, self.recurrent_approx, trainable)
        covered = {id(p) for b in blocks for p in b.params}
        left = [n for n, p in module.named_parameters(recurse=False)
                if trainable(p) and id(p) not in covered]  # fmt: skip
        if left:  # e.g. a trainable bias of a frozen weight
            self.unsupported.append(f"{name}: {', '.join(left)} belong to no K-FAC block")
        self.recurrent[module] = {b.key: b for b in blocks}
        if not blocks:  # known, so that discovery does not add it again
            return
        for p in module.parameters(recurse=False):
            self.wanted.discard(id(p))
        hook = _RecurrentHook(self)
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def add_module(self, module: nn.Module, name: str) -> _ForwardHook | None:
        """Track ``module`` if its weight is trainable; returns its forward hook."""
        if isinstance(module, RECURRENT_LAYERS):
            self.add_recurrent(module, name)
            return None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.requires_grad:
            return None
        bias = getattr(module, "bias", None)
        has_bias = isinstance(bias, Tensor) and bias.requires_grad
        if has_bias and self.discovering and id(bias) not in self.wanted:
            has_bias = False  # not the optimizer's: a constant of the layer, as a frozen bias is
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
            name = name or type(module).__name__.lower()
            if is_supported(module) or isinstance(module, RECURRENT_LAYERS):
                self.add_module(module, name)
            else:
                self.note_unsupported(module, name)

    def note_unsupported(self, module: nn.Module, name: str) -> None:
        """Name a layer (a module without submodules) whose trainable parameters K-FAC cannot
        precondition: they get the plain gradient. Containers' own parameters (e.g. a Gaussian
        policy's log-std) are not layers."""
        if next(module.children(), None) is not None:
            return
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if self.discovering:
            own = [p for p in own if id(p) in self.wanted]
        if not own:
            return
        self.unsupported.append(
            f"{name}: {type(module).__name__} has no K-FAC block (supported: Linear, Conv2d, "
            "RNN, LSTM, GRU and their cells)"
        )
        for p in own:
            self.wanted.discard(id(p))

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

    def __repr__(self) -> str:
        return (
            f"StatisticsCapture(blocks={len(self.all_blocks())}, conv_approx={self.conv_approx!r}, "
            f"empirical={self.empirical}, armed={self._armed}, discovering={self.discovering})"
        )

    # -- pickling: the global hook handle points into torch's module-level registry ------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_discovery"] = self._discovery is not None
        state["wanted"] = None
        state["_records"] = []
        state["_forward_log"] = []
        state["_recording"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        discovering = state.pop("_discovery")
        self.__dict__.update(state)
        self._discovery = None
        found = {id(p) for b in self.all_blocks() for p in b.params}
        self.wanted = {id(p) for p in self._wanted_params} - found
        if discovering:
            self._discovery = nn.modules.module.register_module_forward_hook(_DiscoveryHook(self))
