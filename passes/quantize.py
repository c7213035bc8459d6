"""Weight-only quantization (``options={"quantize": ...}``): each ``fxforge::linear`` with a
constant fp32 weight gets a quantized weight format (:mod:`fxforge.irgraph.weight_format`) with
its codes, scales and offsets as new constants; the math stays in the activations' dtype.

The option, parsed once by :func:`parse_quantize` into rules (first match wins):

* a scheme: ``"int8"`` (per-output-channel symmetric int8), ``"int4"`` (= ``"int4:g32"``),
  ``"int4:g64"``, ``"int4:g128"``; a rounding may follow: ``"int4:g64:rtn"`` (round to nearest) or
  ``":mse"`` (the default: :mod:`fxforge.passes.quantize_math`);
* or a dict: ``{"default": "int4:g64", "lm_head": "int8", "layers.0.*": "int8", "skip":
  ["layers.1.mlp.*"]}``: keys other than ``default`` and ``skip`` are ``fnmatch`` patterns on the
  model's weight names (``layers.0.mlp.up_proj`` matches the weight ``layers.0.mlp.up_proj.weight``;
  a projection fused from several weights matches by any of them), tried in the order given;
  ``skip`` lists patterns left unquantized; without ``default`` unmatched weights stay fp32.

A tied embedding / LM head shares one fp32 tensor: the LM head's linear gets its own quantized
copy, the embedding's gather keeps the fp32 table.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.capture import WEIGHT_NAME_KEY
from fxforge.irgraph.query import is_view_op, tensor_meta
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import DENSE, pack_nibbles
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.quantize_math import ROUNDINGS, quantize_int4, quantize_int8_channel

log = logging.getLogger("fxforge.passes.quantize")
aten = torch.ops.aten
SKIP = "none"
_SCHEMES = {"int8": "int8_channel", "int4": "int4_g32", "int4:g32": "int4_g32",
            "int4:g64": "int4_g64", "int4:g128": "int4_g128"}
Rules = tuple[tuple[str, str], ...]   # (name pattern, "format:rounding" or SKIP), first match wins


class QuantizeSpecError(ValueError):
    """A quantize option that names no known scheme, rounding or pattern form."""


def parse_scheme(text: Any) -> str:
    """``"int4:g64:rtn"`` -> ``"int4_g64:rtn"`` (a weight format and a rounding); a parsed
    scheme is returned as it is."""
    if not isinstance(text, str):
        raise QuantizeSpecError(f"a quantize scheme is a string, got {text!r}")
    parts = text.split(":")
    rounding = parts.pop() if len(parts) > 1 and parts[-1] in ROUNDINGS else "mse"
    base = ":".join(parts)
    if base in _SCHEMES.values():
        return f"{base}:{rounding}"
    if base not in _SCHEMES:
        raise QuantizeSpecError(f"unknown quantize scheme {text!r}; the schemes are "
                                f"{sorted(_SCHEMES)}, optionally followed by ':rtn' or ':mse'")
    return f"{_SCHEMES[base]}:{rounding}"


def parse_quantize(spec: Any) -> Optional[Rules]:
    """The option as rules (hashable: compile options are cache keys), or None for none."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, (tuple, list)) and all(isinstance(r, (tuple, list)) and len(r) == 2
                                               for r in spec):   # parsed rules, back from a dict/JSON
        spec = {pattern: rule for pattern, rule in spec}
    if isinstance(spec, str):
        return (("*", parse_scheme(spec)),)
    if not isinstance(spec, dict):
        raise QuantizeSpecError(f"quantize must be a scheme string or a dict, got {spec!r}")
    rules: list[tuple[str, str]] = []
    skip = spec.get("skip", [])
    if isinstance(skip, str):
        skip = [skip]
    if not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):
        raise QuantizeSpecError(f"quantize 'skip' must be a list of name patterns, got {skip!r}")
    rules += [(pattern, SKIP) for pattern in skip]
    for pattern, scheme in spec.items():
        if pattern in ("default", "skip"):
            continue
        if not isinstance(pattern, str):
            raise QuantizeSpecError(f"quantize pattern {pattern!r} is not a string")
        rules.append((pattern, SKIP if scheme in (None, SKIP) else parse_scheme(scheme)))
    if spec.get("default") is not None:
        rules.append(("*", parse_scheme(spec["default"])))
    if all(scheme == SKIP for _, scheme in rules):
        raise QuantizeSpecError(f"quantize {spec!r} names no scheme: it would quantize nothing")
    return tuple(rules)


def rule_for(rules: Rules, names: str) -> Optional[str]:
    """The first rule whose pattern matches one of ``names`` (comma-joined weight names; a
    pattern also matches a name's module, i.e. without its last ``.weight``), or None."""
    candidates = [n for name in names.split(",") if name for n in (name, name.rsplit(".", 1)[0])]
    for pattern, scheme in rules:
        if pattern == "*" or any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            return None if scheme == SKIP else scheme
    return None


def _weight_constant(ir: IRGraph, node: Any) -> Optional[tuple[torch.Tensor, fx.Node]]:
    """(the [K, N] value, the constant behind it) when ``node`` is a constant or views of one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = getattr(ir.gm, node.target)
        return (value, node) if isinstance(value, torch.Tensor) else None
    if node.op != "call_function" or not is_view_op(node.target):
        return None
    inner = _weight_constant(ir, node.all_input_nodes[0] if node.all_input_nodes else None)
    if inner is None or len(node.all_input_nodes) != 1:
        return None
    args = fx.node.map_arg(node.args, lambda n: inner[0])
    return node.target(*args, **node.kwargs), inner[1]


def _add_transposed(ir: IRGraph, name: str, value_nk: torch.Tensor, before: fx.Node) -> fx.Node:
    """A constant stored ``[rows, N]``-major as the kernels read it, seen ``[N-last]`` by the op."""
    const = ir.add_constant(name, value_nk.contiguous(), before)
    with ir.gm.graph.inserting_before(before):
        view = ir.gm.graph.call_function(aten.permute.default, (const, [1, 0]))
    ir.infer(view)
    return view


def _quantize_linear(ir: IRGraph, linear: Linear, scheme: str, name: str) -> None:
    fmt, rounding = scheme.split(":")
    value, _ = _weight_constant(ir, linear.weight)
    weight_nk = value.t()
    before = linear.node
    if fmt == "int8_channel":
        codes, scales = quantize_int8_channel(weight_nk, rounding, name)
        extras = {"scales": _add_transposed(ir, "q_scales", scales, before)}
    else:
        group = int(fmt.split("_g")[1])
        codes, scales, offsets = quantize_int4(weight_nk, group, rounding, name)
        codes = pack_nibbles(codes.t()).t()   # two codes per byte along K
        extras = {"scales": _add_transposed(ir, "q_scales", scales, before),
                  "offsets": _add_transposed(ir, "q_offsets", offsets, before)}
    weight = _add_transposed(ir, "q_codes", codes, before)
    linear.replace(weight=weight, weight_format=fmt, **extras)
    ir.infer(linear.node)


def quantize_weights(ir: IRGraph, rules: Rules) -> PassResult:
    """Every fp32 constant-weight linear a rule matches gets its quantized format."""
    counts: Counter = Counter()
    for node in list(ir.gm.graph.nodes):
        linear = Linear.of(node)
        if linear is None or linear.weight_format != DENSE:
            continue
        found = _weight_constant(ir, linear.weight)
        meta = tensor_meta(linear.weight)
        if found is None or meta is None or meta.dtype != torch.float32:
            counts["not_constant"] += 1
            continue
        names = found[1].meta.get(WEIGHT_NAME_KEY) or str(found[1].target)
        scheme = rule_for(rules, names)
        if scheme is None:
            counts["skipped"] += 1
            continue
        _quantize_linear(ir, linear, scheme, names)
        counts[scheme.split(":")[0]] += 1
    ir.gm.graph.eliminate_dead_code()
    used = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in ir.gm.named_buffers() if name not in used]:
        delattr(ir.gm, name)   # the fp32 copies the quantized linears replaced
    log.info("quantize: %s", dict(counts))
    return PassResult(ir, dict(counts))


def quantize_pass(rules: Rules) -> Pass:
    """The pass for one parsed option (its rules are part of it, so it is not registered by name)."""
    return Pass("quantize", lambda ir: quantize_weights(ir, rules),
                "weight-only quantization of constant-weight linears")
