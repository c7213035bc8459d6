"""Lowering: IR -> a callable, through a backend, with eager fallback partitions.

A backend says per node whether it can run it (``supports`` returns ``None`` or a reason) and
compiles a partition of supported nodes into a callable. :func:`lower` splits the graph with
torch.fx's capability-based partitioner: supported regions become compiled submodules, every
other node runs eagerly on ATen in the top-level graph, and each fallback is logged with its
reason. A partition whose compilation raises falls back to eager too: lowering never makes the
user's program crash because of one op.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from fxforge.irgraph import IRGraph, op_name

log = logging.getLogger("fxforge.backends")


class Backend:
    """Base class: subclasses set ``name`` and override ``supports``/``compile_partition``."""

    name = "base"

    @staticmethod
    def unavailable() -> Optional[str]:
        """What this backend lacks in this process (a device, a package), or None if it runs."""
        return None

    def supports(self, node: fx.Node) -> Optional[str]:
        """``None`` if this backend can run ``node``, else the reason it cannot."""
        raise NotImplementedError

    def compile_partition(self, gm: fx.GraphModule) -> Callable:
        """Compile a GraphModule made only of supported nodes into a callable."""
        raise NotImplementedError

    def precision_unsupported(self, precision: str) -> Optional[str]:
        """Why ``precision`` ("bf16", "fp16") has no fast path here, or ``None`` if it has."""
        return None

    @property
    def weight_formats(self) -> frozenset:
        """The weight formats (``irgraph.weight_format``) this backend's linear kernels store
        natively, so marking a weight with a lossless one is worth it; the reference decodes
        every implemented format."""
        return frozenset({"dense"})

    def weight_only_precision(self, precision: str) -> Optional[str]:
        """Where ``precision`` has no fast math path: the weight-only variant this backend makes
        faster (weights stored in the low dtype, math in fp32), e.g. ``"bf16_weights"``, or None."""
        return None


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _BACKENDS[name] = factory


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise KeyError(f"unknown fxforge backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


@dataclass
class Fallback:
    node: str
    op: str
    reason: str


@dataclass
class LoweredGraph:
    """The runtime form of an IR: call it with the graph's inputs, get its outputs."""

    gm: fx.GraphModule
    backend: str
    partitions: int
    fallbacks: list[Fallback] = field(default_factory=list)
    # What each kernel-generating backend decided, per op or fusion group (KernelChoice records),
    # and how many kernels one call launches; read from the lowered modules themselves
    # (``kernel_lowering.kernel_choices``): each lowering has its own, never the backend's.
    choices: list = field(default_factory=list)
    kernels: Optional[int] = None

    def __call__(self, *args):
        return self.gm(*args)


class _Support(OperatorSupportBase):
    def __init__(self, backend: Backend, fallbacks: list[Fallback]):
        self.backend = backend
        self.fallbacks = fallbacks

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        reason = self.backend.supports(node)
        if reason is not None:
            self.fallbacks.append(Fallback(node.name, op_name(node.target), reason))
        return reason is None


def lower(ir: IRGraph, backend: Backend) -> LoweredGraph:
    gm = ir.gm
    fallbacks: list[Fallback] = []
    support = _Support(backend, fallbacks)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    supported = [support.is_node_supported({}, n) for n in calls]
    for fb in fallbacks:
        log.warning("fxforge[%s]: %s (%s) runs eagerly: %s", backend.name, fb.op, fb.node, fb.reason)
    if all(supported):
        compiled = _compile_or_eager(backend, gm, "graph")
        return _finish(LoweredGraph(compiled, backend.name, 1, fallbacks), backend)
    gm = copy_module(gm)  # partitioning rewrites the graph: the IR itself stays as it was
    partitioner = CapabilityBasedPartitioner(gm, _Support(backend, []), allows_single_node_partition=True)
    partitions = partitioner.propose_partitions()
    fused = partitioner.fuse_partitions(partitions)
    for node in list(fused.graph.nodes):
        if node.op == "call_module":
            sub = getattr(fused, node.target)
            _inline_constants(fused, node, sub)
            setattr(fused, node.target, _AsModule(_compile_or_eager(backend, sub, node.target)))
    drop_unused_tensors(fused)
    fused.recompile()
    return _finish(LoweredGraph(fused, backend.name, len(partitions), fallbacks), backend)


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new module over a copy of the graph (metadata shallow-copied), sharing the tensors."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        new.meta = dict(old.meta)
    return fx.GraphModule(gm, graph)


def drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Tensors nothing reads any more (a linear's weight now lives packed in its kernel, a
    partition's constants in the partition), with their unused ``get_attr`` nodes: the module
    would otherwise keep them alive."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for table in (gm._buffers, gm._parameters):
        for name in [name for name in table if name not in used]:
            del table[name]


def _finish(lowered: LoweredGraph, backend: Backend) -> LoweredGraph:
    """Attach this lowering's kernel choices and the number of kernels a call launches."""
    from fxforge.backends.kernel_lowering import kernel_choices, kernel_count
    lowered.choices = kernel_choices(lowered.gm)
    lowered.kernels = kernel_count(lowered.gm) if isinstance(lowered.gm, fx.GraphModule) else None
    return lowered


def _inline_constants(parent: fx.GraphModule, call: fx.Node, sub: fx.GraphModule) -> None:
    """Partition inputs that are constants of the parent become constants of the partition,
    so a backend sees its weights (to prepack them) instead of runtime inputs."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    keep = []
    for placeholder, arg in zip(placeholders, call.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            sub.register_buffer(arg.target, getattr(parent, arg.target))
            with sub.graph.inserting_before(placeholder):
                const = sub.graph.get_attr(arg.target)
            const.meta = dict(arg.meta)
            placeholder.replace_all_uses_with(const)
            sub.graph.erase_node(placeholder)
        else:
            keep.append(arg)
    call.args = tuple(keep)
    sub.recompile()


class _AsModule(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _compile_or_eager(backend: Backend, gm: fx.GraphModule, what: str) -> Callable:
    try:
        return backend.compile_partition(gm)
    except Exception as exc:  # a broken kernel build must not break the user's program
        log.warning("fxforge[%s]: compiling %s failed (%s: %s); it runs eagerly",
                    backend.name, what, type(exc).__name__, exc)
        return gm
