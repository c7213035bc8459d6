"""Capture: turn a model (export path) or a dynamo graph (backend path) into an IRGraph.

Both ways in end in :func:`build_ir`, so the IR has one op set and one set of invariants:
core ATen (``torch._decomp.core_aten_decompositions``) except the high-level ops in
:data:`KEPT_OPS`, which the later passes and kernels want whole. ``linear`` is
CompositeImplicit and always arrives decomposed, as ``addmm(bias, x2d, t(w))`` / ``mm``
(``permute`` instead of ``t`` through export).
"""
from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx
from torch._decomp import core_aten_decompositions

from fxforge.errors import FxforgeError
from fxforge.irgraph.compile_profile import phase, record
from fxforge.irgraph.graph import IRGraph, _free_attr_name, hoist_get_attrs
from fxforge.irgraph.meta import META_KEY, meta_of

log = logging.getLogger("fxforge.capture")
aten = torch.ops.aten

# Ops kept whole instead of decomposed into core ATen: attention, norms, softmax,
# activations the fusion passes and kernels match as units.
KEPT_OPS = (
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten.silu.default,
    aten.rms_norm.default,
    aten._fused_rms_norm.default,
    aten.native_layer_norm.default,
    aten._softmax.default,
    aten._log_softmax.default,
    aten.gelu.default,
    aten.addmm.default,
    aten.mm.default,
    aten.bmm.default,
)


# export's trace-time dtype/device asserts: the IR's metadata (and an artifact's input check)
# already guarantees them; unlike ``_assert_scalar`` they guard nothing that changes at run time.
_REDUNDANT_ASSERTS = (aten._assert_tensor_metadata.default,)
_PRIMS_CONVERT = torch.ops.prims.convert_element_type.default


@functools.lru_cache(maxsize=None)
def decomposition_table() -> dict:
    """Built once (it costs ~50 ms); callers must not modify it."""
    table = dict(core_aten_decompositions())
    for op in KEPT_OPS:
        table.pop(op, None)
    return table


class CaptureError(FxforgeError, RuntimeError):
    """The model could not be captured into fxforge's IR."""


def build_ir(gm: fx.GraphModule, fake_mode: Any, constants: dict[str, torch.Tensor],
             info: Optional[dict] = None) -> IRGraph:
    """Normalise a functional ATen GraphModule into an IRGraph.

    ``constants`` maps placeholder names to the real tensors that become ``get_attr``
    constants (weights and buffers); every other placeholder stays a runtime input.
    """
    owner = torch.nn.Module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _REDUNDANT_ASSERTS:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is _PRIMS_CONVERT:
            _as_to_copy(node)
        elif node.op == "placeholder" and node.name in constants:
            name = _free_attr_name(owner, node.name)
            owner.register_buffer(name, constants[node.name].detach())
            with graph.inserting_before(node):
                const = graph.create_node("get_attr", name)
            const.meta = dict(node.meta)
            node.replace_all_uses_with(const)
            graph.erase_node(node)
        elif node.op == "get_attr":
            value = _get_nested_attr(gm, node.target)
            name = _free_attr_name(owner, str(node.target))
            if isinstance(value, torch.Tensor):
                owner.register_buffer(name, value.detach())
            else:
                setattr(owner, name, value)
            node.target = name
    hoist_get_attrs(graph)
    for node in graph.nodes:
        if node.op in ("placeholder", "call_function", "get_attr"):
            if "val" not in node.meta and node.op == "get_attr":
                value = getattr(owner, node.target)
                if isinstance(value, torch.Tensor):
                    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
            node.meta[META_KEY] = meta_of(node.meta.get("val"))
    new_gm = fx.GraphModule(owner, graph)
    return IRGraph(new_gm, fake_mode, dict(info or {}))


def _as_to_copy(node: fx.Node) -> None:
    """``prims.convert_element_type(x, dtype)`` -> ``aten._to_copy(x, dtype=dtype)``: the same
    values and (for the dense tensors the prim produces) layout. The prim runs through Python
    at every call (~140 us a call, measured on a 0-d float64 RMSNorm eps: 2.5 ms of a SmolLM2
    decode token), and the passes and kernels know casts as ``_to_copy``."""
    source, dtype = node.args[:2]
    node.target, node.args, node.kwargs = aten._to_copy.default, (source,), {"dtype": dtype}


def _get_nested_attr(module: Any, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _is_weight_source(source: Any) -> bool:
    """Dynamo sources of module parameters/buffers (lifted to graph inputs by dynamo)."""
    if source is None:
        return False
    name = source.name if isinstance(source.name, str) else source.name()
    return "._parameters[" in name or "._buffers[" in name or name.startswith("G[")


# node.meta key of a weight constant: the model's dotted name for it ("layers.0.mlp.up_proj.weight";
# a constant folded from several weights: their names joined by ","), for per-layer options.
WEIGHT_NAME_KEY = "fxf_weight_name"


def weight_name_of_source(source_name: str) -> str:
    """Dynamo's source text of a module weight -> its dotted name:
    ``L['self']._modules['layers']._modules['0']._parameters['weight']`` -> ``layers.0.weight``."""
    keys = re.findall(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", source_name)
    if keys:
        return ".".join(keys)
    dotted = re.sub(r"^L\['[^']*'\]\.?", "", source_name)       # attribute-style sources
    return re.sub(r"\[(\d+)\]", r".\1", dotted)


def dynamo_weight_names(gm: fx.GraphModule, indices: Iterable[int]) -> dict[int, str]:
    """Input index -> dotted weight name, for the dynamo inputs at ``indices``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = {}
    for i in indices:
        source = getattr(placeholders[i].meta.get("grapharg"), "source", None)
        if source is not None:
            names[i] = weight_name_of_source(source.name if isinstance(source.name, str) else source.name())
    return names


def dynamo_weight_indices(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """Indices of dynamo graph inputs that are module weights (parameters and buffers)."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if isinstance(value, torch.nn.Parameter) or (
                isinstance(value, torch.Tensor) and _is_weight_source(source)):
            out.append(i)
    return out


def capture_export(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None,
                   dynamic_shapes: Any = None) -> IRGraph:
    """AOT path: ``torch.export`` + decomposition to fxforge's op set; weights become constants."""
    try:
        ep = torch.export.export(model, args, kwargs=kwargs or {}, dynamic_shapes=dynamic_shapes)
        ep = ep.run_decompositions(decomposition_table())
    except Exception as exc:  # export errors are long; keep their first lines in ours
        lines = [line for line in str(exc).splitlines() if line.strip()][:4]
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                           + ("\n".join(lines) or type(exc).__name__)) from exc
    sig = ep.graph_signature
    mutations = [o for o in sig.output_specs if o.kind.name != "USER_OUTPUT"]
    if mutations:
        raise CaptureError("the model mutates its buffers or inputs "
                           f"({', '.join(str(o.target) for o in mutations)}); "
                           "AOT artifacts need a functional forward")
    state = {**ep.state_dict, **ep.constants}
    constants = {}
    placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    for spec in sig.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            constants[spec.arg.name] = state[spec.target]
            placeholders[spec.arg.name].meta[WEIGHT_NAME_KEY] = spec.target   # build_ir keeps it
    fake_mode = _fake_mode_of(ep.graph_module)
    ir = build_ir(ep.graph_module, fake_mode, constants, {"capture": "export"})
    ir.info["range_constraints"] = {str(k): (int(v.lower), _upper(v.upper))
                                    for k, v in ep.range_constraints.items()}
    return ir


def _upper(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None  # unbounded (torch's int_oo fails inside sympy's int(): AttributeError)


def _fake_mode_of(gm: fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
    return mode


def _plain_outputs() -> bool:
    """Whether aot_autograd's runtime wrapper around the graph being compiled only passes its
    outputs through: no input it copies mutations back into, no output it regenerates as a view
    of an input or intermediate, no effect tokens. Only then may a caller run the compiled graph
    without that wrapper (``fxforge/direct_steps.py``); False when the metadata is not there."""
    try:
        from torch._functorch._aot_autograd.schemas import OutputType
        from torch._guards import TracingContext
        context = TracingContext.try_get()
        meta = getattr(context, "fw_metadata", None)
        if meta is None:
            return False
        return (meta.num_mutated_inp_runtime_indices == 0 and not meta.tokens
                and getattr(meta, "num_intermediate_bases", 0) == 0
                and all(out.output_type == OutputType.non_alias for out in meta.output_info))
    except (ImportError, AttributeError):
        return False


def capture_aot_inference(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          weight_indices: Iterable[int],
                          compile_ir: Callable[[IRGraph, list[int]], Callable]) -> Callable:
    """Backend path: run aot_autograd on dynamo's graph; ``compile_ir`` gets the IR.

    ``compile_ir(ir, weight_positions)`` receives the IR with weights still as placeholders
    (their positions among the placeholders listed) and returns the runtime callable.
    """
    from torch._dynamo.backends.common import aot_autograd

    weight_indices = list(weight_indices)
    weight_names = dynamo_weight_names(gm, weight_indices)

    def fw_compiler(aot_gm: fx.GraphModule, aot_inputs: Sequence[Any]) -> Callable:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():  # aot_autograd calls us inside its fake mode
            return _compile(aot_gm)

    def _compile(aot_gm: fx.GraphModule) -> Callable:
        start = time.perf_counter()
        try:
            return _compile_ir(aot_gm)
        finally:
            inside.append(time.perf_counter() - start)

    def _compile_ir(aot_gm: fx.GraphModule) -> Callable:
        fake_mode = _fake_mode_of(aot_gm)
        with phase("capture: build IR"):
            ir = build_ir(aot_gm, fake_mode, {}, {"capture": "dynamo",
                                                  "plain_outputs": _plain_outputs()})
        n_inputs = len(ir.placeholders())
        positions = weight_indices if n_inputs == len(example_inputs) else []
        placeholders = ir.placeholders()
        for position in positions:   # freezing turns them into constants and keeps the meta
            if position in weight_names:
                placeholders[position].meta[WEIGHT_NAME_KEY] = weight_names[position]
        if weight_indices and not positions:
            log.info("aot_autograd changed the input list (%d -> %d): weights are not frozen",
                     len(example_inputs), n_inputs)
        return compile_ir(ir, positions)

    backend = aot_autograd(fw_compiler=fw_compiler, decompositions=decomposition_table())
    inside: list[float] = []   # the time aot_autograd spent in fxforge's compile
    record("capture: aot_autograd", 0.0, calls=0)   # listed first, timed below
    start = time.perf_counter()
    try:
        return backend(gm, example_inputs)
    finally:
        record("capture: aot_autograd", time.perf_counter() - start - sum(inside))
