"""Weight-only quantization (``options={"quantize": ...}``): each ``fxforge::linear`` with a
constant fp32 weight gets a quantized weight format (:mod:`fxforge.irgraph.weight_format`) with
its codes, scales and offsets as new constants; the math stays in the activations' dtype.

The option, parsed once by :func:`parse_quantize` into rules (first match wins):

* a scheme: ``"int8"`` (per-output-channel symmetric int8), ``"int4"`` (= ``"int4:g32"``),
  ``"int4:g64"``, ``"int4:g128"``; a rounding may follow: ``"int4:g64:rtn"`` (round to nearest) or
  ``":mse"`` (:mod:`fxforge.passes.quantize_math`); the default is :data:`DEFAULT_ROUNDING`; a
  group size that does not divide a weight's K falls back to the largest of 128/64/32 that does
  (logged);
* ``"auto"``: a format per linear (fp32, int8, int4 g128/g64/g32) chosen for decode speed within
  the ``accuracy_budget`` option, measured on the compile's example inputs
  (:mod:`fxforge.passes.quantize_auto`);
* ``"w8a8"`` (``":nosmooth"``, ``":noguard"``): int8 weights *and* activations (quantized per
  row at run time), SmoothQuant smoothing and an outlier guard that keeps a linear weight-only
  int8 where int8 activations measure too costly, both calibrated on the compile's example inputs
  (:mod:`fxforge.passes.smoothquant`);
* ``"gguf:PATH"``: a model loaded from that GGUF file runs the file's own Q8_0/Q4_0/Q4_1 blocks
  (``int8_g32``/``int4_g32``, bit-exact to the file's dequantized weights; a weight the file
  does not hold exactly stays fp32, logged);
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
from fxforge.irgraph.gguf import open_blocks
from fxforge.irgraph.query import is_view_op, tensor_meta
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import DENSE, W8A8, pack_nibbles
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.gptq import calibration_inputs, gptq_quantize, linear_hessians
from fxforge.passes.quantize_math import (ROUNDINGS, check_quantizable, quantize_int4,
                                          quantize_int8_channel)
from fxforge.passes.smoothquant import W8A8SpecError, encode_w8a8, parse_w8a8, w8a8_choices

log = logging.getLogger("fxforge.passes.quantize")
aten = torch.ops.aten
SKIP = "none"
_SCHEMES = {"int8": "int8_channel", "int4": "int4_g32", "int4:g32": "int4_g32",
            "int4:g64": "int4_g64", "int4:g128": "int4_g128"}
# The clip search lowers the weight error but raised SmolLM2's perplexity against round to
# nearest at int4 g32 and g64, and matched it at int8 for 3x the compile time (bench/RESULTS.md):
# round to nearest is the default until a rounding measures better on real text
DEFAULT_ROUNDING = {"int8": "rtn", "int4": "rtn"}
# On a weight constant: the whole ``[N, K]`` weight whose input features (K) it is a slice of
# (a row-parallel linear's shard: passes/tensor_parallel.py), for per-row quantization scales.
WHOLE_ROWS_KEY = "fxforge_whole_rows"
GGUF = "gguf"   # "gguf:PATH": the file's own blocks (irgraph/gguf.py), bit-exact
AUTO = "auto"   # a format per linear within ``accuracy_budget`` (passes/quantize_auto.py)
Rules = tuple[tuple[str, str], ...]   # (name pattern, "format:rounding" or SKIP), first match wins


class QuantizeSpecError(ValueError):
    """A quantize option that names no known scheme, rounding or pattern form."""


def parse_scheme(text: Any) -> str:
    """``"int4:g64:rtn"`` -> ``"int4_g64:rtn"`` (a weight format and a rounding); a parsed
    scheme is returned as it is."""
    if not isinstance(text, str):
        raise QuantizeSpecError(f"a quantize scheme is a string, got {text!r}")
    if text.startswith(GGUF + ":"):   # a path may hold ':' itself
        if not text[len(GGUF) + 1:]:
            raise QuantizeSpecError(f"{text!r} names no file: use 'gguf:/path/to/model.gguf'")
        return text
    if text == AUTO:
        return AUTO
    if text.split(":")[0] == W8A8:   # its own modifiers (passes/smoothquant.py)
        try:
            return parse_w8a8(text)
        except W8A8SpecError as exc:
            raise QuantizeSpecError(str(exc)) from None
    parts = text.split(":")
    rounding = parts.pop() if len(parts) > 1 and parts[-1] in ROUNDINGS else None
    base = ":".join(parts)
    fmt = base if base in _SCHEMES.values() else _SCHEMES.get(base)
    if fmt is None:
        raise QuantizeSpecError(f"unknown quantize scheme {text!r}; the schemes are "
                                f"{sorted(_SCHEMES)}, optionally followed by ':rtn', ':mse' or ':gptq', and "
                                f"{W8A8!r} (W8A8 dynamic)")
    return f"{fmt}:{rounding or DEFAULT_ROUNDING[fmt.split('_')[0]]}"


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


def weight_constant(ir: IRGraph, node: Any) -> Optional[tuple[torch.Tensor, fx.Node]]:
    """(the [K, N] value, the constant behind it) when ``node`` is a constant or views of one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = getattr(ir.gm, node.target)
        return (value, node) if isinstance(value, torch.Tensor) else None
    if node.op != "call_function" or not is_view_op(node.target):
        return None
    inner = weight_constant(ir, node.all_input_nodes[0] if node.all_input_nodes else None)
    if inner is None or len(node.all_input_nodes) != 1:
        return None
    args = fx.node.map_arg(node.args, lambda n: inner[0])
    return node.target(*args, **node.kwargs), inner[1]


def add_transposed(ir: IRGraph, name: str, value_nk: torch.Tensor, before: fx.Node) -> fx.Node:
    """A constant stored ``[rows, N]``-major as the kernels read it, seen ``[N-last]`` by the op."""
    const = ir.add_constant(name, value_nk.contiguous(), before)
    with ir.gm.graph.inserting_before(before):
        view = ir.gm.graph.call_function(aten.permute.default, (const, [1, 0]))
    ir.infer(view)
    return view


def _encode(weight_nk: torch.Tensor, scheme: str, name: str, calibrated: Any = None,
            regrouped: Optional[list] = None, whole_nk: Optional[torch.Tensor] = None
            ) -> Optional[tuple]:
    """(format, codes, scales, offsets) in ``[N, ...]`` orientation for ``scheme``, or None (the
    linear stays fp32; the reason is logged). ``calibrated``: what the scheme measured on the
    calibration inputs: the input Hessian for ``gptq`` rounding, a ``W8A8Choice`` for ``w8a8``.
    A group that does not divide K falls back to one that does: noted in ``regrouped`` as
    (name, K, group, used) for one summary line, else logged here. ``whole_nk``: the whole rows
    of a tensor-parallel shard (:data:`WHOLE_ROWS_KEY`): per-channel int8 scales come from them
    (int4 groups lie within a shard already)."""
    if scheme.startswith(GGUF + ":"):
        found = open_blocks(scheme[len(GGUF) + 1:]).find(weight_nk)
        if found is None:
            log.warning("quantize: %s: no Q8_0/Q4_0/Q4_1 tensor of %s holds exactly this "
                        "weight; it stays fp32", name, scheme[len(GGUF) + 1:])
            return None
        fmt, codes, scales, offsets = found   # [K, N] views: back to [N, ...]
        return fmt, codes.t(), scales.t(), offsets.t() if offsets is not None else None
    if scheme.startswith(W8A8 + ":"):
        return encode_w8a8(weight_nk, calibrated, name)
    fmt, rounding = scheme.split(":")
    if rounding == "gptq" and calibrated is None:
        rounding = "rtn"   # no calibration inputs (quantize_weights said so once)
    if fmt == "int8_channel":
        if rounding == "gptq":
            return (fmt, *gptq_quantize(weight_nk, calibrated, None), None)
        return (fmt, *quantize_int8_channel(weight_nk, rounding, name, whole_nk), None)
    group = int(fmt.split("_g")[1])
    k = weight_nk.shape[1]
    if k % group:
        fits = [g for g in (128, 64, 32) if g < group and k % g == 0]
        if not fits:
            log.warning("quantize: %s: %d input features are not a multiple of %d (nor of 32); "
                        "it stays fp32", name, k, group)
            return None
        if regrouped is None:
            log.warning("quantize: %s: %d input features are not a multiple of %d: groups of %d",
                        name, k, group, fits[0])
        else:
            regrouped.append((name, k, group, fits[0]))
        group, fmt = fits[0], f"int4_g{fits[0]}"
    if rounding == "gptq":
        check_quantizable(weight_nk, name, group)
        codes, scales, offsets = gptq_quantize(weight_nk, calibrated, group)
    else:
        codes, scales, offsets = quantize_int4(weight_nk, group, rounding, name)
    return fmt, pack_nibbles(codes.t()).t(), scales, offsets   # two codes per byte along K


def _quantize_linear(ir: IRGraph, linear: Linear, scheme: str, name: str,
                     calibrated: Any, regrouped: list) -> Optional[str]:
    """Give ``linear`` its quantized weight; the format used, or None if it stays fp32."""
    value, const = weight_constant(ir, linear.weight)
    encoded = _encode(value.t(), scheme, name, calibrated, regrouped,
                      const.meta.get(WHOLE_ROWS_KEY))
    if encoded is None:
        return None
    fmt, codes, scales, offsets = encoded
    before = linear.node
    extras = {"scales": add_transposed(ir, "q_scales", scales, before)}
    if offsets is not None:
        extras["offsets"] = add_transposed(ir, "q_offsets", offsets, before)
    weight = add_transposed(ir, "q_codes", codes, before)
    weight.all_input_nodes[0].meta[WEIGHT_NAME_KEY] = name   # the codes keep the model's name
    linear.replace(weight=weight, weight_format=fmt, **extras)
    ir.infer(linear.node)
    return fmt


def _plan(ir: IRGraph, rules: Rules, counts: Counter) -> list[tuple[Linear, str, str]]:
    """(linear, scheme, weight names) for every fp32 constant-weight linear a rule matches."""
    plan = []
    for node in ir.gm.graph.nodes:
        linear = Linear.of(node)
        if linear is None or linear.weight_format != DENSE:
            continue
        found = weight_constant(ir, linear.weight)
        meta = tensor_meta(linear.weight)
        if found is None or meta is None or meta.dtype != torch.float32:
            counts["not_constant"] += 1
            continue
        names = found[1].meta.get(WEIGHT_NAME_KEY) or str(found[1].target)
        scheme = rule_for(rules, names)
        if scheme is None:
            counts["skipped"] += 1
        else:
            plan.append((linear, scheme, names))
    return plan


def _hessians(ir: IRGraph, plan: list) -> dict:
    """The input Hessians of the linears whose rounding is gptq, from the calibration inputs."""
    wanted = [linear.node for linear, scheme, _ in plan if scheme.endswith(":gptq")]
    if not wanted:
        return {}
    inputs = calibration_inputs()
    if inputs is None or len(inputs) != len(ir.placeholders()):
        log.warning("quantize: gptq rounding needs the compile's example inputs to calibrate on "
                    "(none here); %d linears use round to nearest", len(wanted))
        return {}
    return linear_hessians(ir, inputs, wanted)


def _resolve_auto(ir: IRGraph, plan: list, budget: Optional[tuple], counts: Counter) -> list:
    """``plan`` with each "auto" linear given the scheme ``quantize_auto`` chose (or dropped: fp32)."""
    auto = [i for i, (_, scheme, _) in enumerate(plan) if scheme == AUTO]
    if not auto:
        return plan
    if budget is None:
        raise QuantizeSpecError("quantize 'auto' needs accuracy_budget, e.g. {'kl': 0.01}")
    from fxforge.passes.quantize_auto import auto_formats, candidate
    candidates = [candidate(plan[i][0], plan[i][2], weight_constant(ir, plan[i][0].weight)[0])
                  for i in auto]
    resolved = list(plan)
    for i, scheme in zip(auto, auto_formats(ir, candidates, budget)):
        resolved[i] = (plan[i][0], scheme, plan[i][2])
        counts["auto_kept_fp32"] += scheme is None
    return [entry for entry in resolved if entry[1] is not None]


def quantize_weights(ir: IRGraph, rules: Rules, budget: Optional[tuple] = None) -> PassResult:
    """Every fp32 constant-weight linear a rule matches gets its quantized format; ``budget``:
    the parsed ``accuracy_budget`` the "auto" rules choose within."""
    counts: Counter = Counter()
    plan = _resolve_auto(ir, _plan(ir, rules, counts), budget, counts)
    # before any weight changes: both calibrate on the fp32 graph
    calibrated = _hessians(ir, plan)
    w8a8 = w8a8_choices(ir, plan, lambda node: weight_constant(ir, Linear.of(node).weight)[0].t())
    calibrated.update(w8a8)
    if w8a8:
        counts["w8a8_guarded"] = sum(choice.guarded for choice in w8a8.values())
    regrouped: list = []
    for linear, scheme, names in plan:
        fmt = _quantize_linear(ir, linear, scheme, names, calibrated.get(linear.node), regrouped)
        counts[fmt or "kept_fp32"] += 1
    _log_regrouped(regrouped)
    ir.gm.graph.eliminate_dead_code()
    used = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in ir.gm.named_buffers() if name not in used]:
        delattr(ir.gm, name)   # the fp32 copies the quantized linears replaced
    log.info("quantize: %s", dict(counts))
    return PassResult(ir, dict(counts))


def _log_regrouped(regrouped: list, shown: int = 4) -> None:
    """One line per (asked group, used group) for the linears whose K the asked group does not
    divide (a model can have a hundred: SmolLM2's K = 576 under int4:g128)."""
    by_groups: dict[tuple, list] = {}
    for name, k, group, used in regrouped:
        by_groups.setdefault((group, used), []).append(f"{name} ({k})")
    for (group, used), names in by_groups.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        log.warning("quantize: %d linear(s) have input features that are not a multiple of %d: "
                    "groups of %d for %s%s", len(names), group, used, ", ".join(names[:shown]), more)


def quantize_pass(rules: Rules, budget: Optional[tuple] = None) -> Pass:
    """The pass for one parsed option (its rules are part of it, so it is not registered by name)."""
    return Pass("quantize", lambda ir: quantize_weights(ir, rules, budget),
                "weight-only quantization of constant-weight linears")
