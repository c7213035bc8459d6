"""What ``fxforge.load`` checks in an artifact before using any of it (README: "Trust model").

An artifact is data, and may come from anyone: every field of its manifest is checked for its
type and its vocabulary here (names are identifiers, dtypes come from a table, sizes go through
:mod:`fxforge.irgraph.safe_parse`, input/output structures may only be tuples, lists, dicts and
tensors), the options go through ``parse_options``, and a shipped tuning bundle must be valid.
Nothing read from an artifact is evaluated, imported, unpickled or compiled: kernels are
generated again from the graph, so an artifact carrying kernel sources is refused. The
manifest's SHA-256 hashes catch accidents (a truncated copy, a stale file), not an attacker,
who can rewrite them with the rest of the manifest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sympy
import torch

from fxforge.errors import ArtifactError, FxforgeError, TensorParallelError
from fxforge.irgraph.meta import META_KEY, TensorMeta
from fxforge.irgraph.safe_parse import DTYPES, ParseError, check_name, short_repr
from fxforge.specs import TensorSignature

# The containers an artifact's input/output structure may use (what aot_compile writes).
_TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}
MAX_TREESPEC_DEPTH = 32


def check_manifest(root: Path, manifest: dict) -> list[TensorSignature]:
    """The manifest's input signature, read once; ArtifactError naming the first manifest field
    that is not what fxforge writes."""
    try:
        return _check_fields(manifest)
    except (ParseError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        what = f"a field lacks its entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ArtifactError(f"artifact {root}: manifest.json: {what}") from None


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _check_fields(manifest: dict) -> list[TensorSignature]:
    versions = manifest["versions"]
    _expect(isinstance(versions, dict) and all(isinstance(v, (str, type(None)))
                                               for v in versions.values()), "bad versions")
    _expect(isinstance(manifest["options"], dict), "options is not a dict")
    _expect(isinstance(manifest.get("model"), str), "model is not a string")
    _expect(all(isinstance(d, str) for d in manifest["files"].values()), "bad file digests")
    _expect(not manifest.get("kernels"), "it carries kernel sources; fxforge generates kernels "
            "from the graph and never builds shipped source")
    _expect(isinstance(manifest["inputs"], list), "inputs is not a list")
    signature = [TensorSignature.from_json(entry) for entry in manifest["inputs"]]
    _check_ranges(manifest["ranges"])
    aliases = manifest["aliases"]
    _expect(isinstance(aliases, dict), "aliases is not a dict")
    for alias, canonical in aliases.items():
        check_name(alias, "constant alias")
        check_name(canonical, "constant name")
    for key in ("in_spec", "out_spec"):
        if manifest.get(key) is not None:
            _expect(isinstance(manifest[key], str), f"{key} is not a string")
            _check_treespec(json.loads(manifest[key]), key)
    if manifest.get("kv_cache"):
        _check_kv_plan(manifest["kv_cache"])
    return signature


def _check_ranges(ranges: Any) -> None:
    _expect(isinstance(ranges, dict), "ranges is not a dict")
    for name, bounds in ranges.items():
        check_name(name, "dynamic size name")
        ok = isinstance(bounds, list) and len(bounds) == 2 and _is_int(bounds[0]) and \
            bounds[0] >= 0 and (bounds[1] is None or _is_int(bounds[1]) and bounds[1] >= bounds[0])
        _expect(ok, f"range of {name} is {short_repr(bounds)}, not [low, high] with "
                "0 <= low <= high")


def _check_treespec(spec: Any, key: str) -> None:
    """torch's pytree loader would import and call what a spec names: allow plain containers."""
    _expect(isinstance(spec, list) and len(spec) == 2 and spec[0] == 1, f"{key}: bad treespec")
    stack = [(spec[1], 0)]
    while stack:
        node, depth = stack.pop()
        _expect(isinstance(node, dict) and set(node) == {"type", "context", "children_spec"}
                and node["type"] in _TREESPEC_TYPES and isinstance(node["children_spec"], list)
                and depth <= MAX_TREESPEC_DEPTH, f"{key}: not a tuple/list/dict structure")
        context = node["context"]
        if node["type"] == "builtins.dict":
            keys = json.loads(context) if isinstance(context, str) else None
            _expect(isinstance(keys, list) and all(isinstance(k, (str, int)) for k in keys),
                    f"{key}: dict keys must be strings or integers")
        else:
            _expect(context in (None, "null"), f"{key}: unexpected context {short_repr(context)}")
        stack.extend((child, depth + 1) for child in node["children_spec"])


def _check_kv_plan(plan: Any) -> None:
    _expect(isinstance(plan, dict), "kv_cache is not a dict")
    _expect(all(_is_int(plan[k]) and plan[k] >= 0 for k in ("tokens", "sites", "positions")),
            "kv_cache: tokens, sites and positions must be integers")
    check_name(plan["cache_pos"], "kv_cache position input")
    _expect(isinstance(plan["seq_outputs"], list) and all(_is_int(i) and i >= 0
                                                          for i in plan["seq_outputs"]),
            "kv_cache: bad seq_outputs")
    _expect(isinstance(plan["caches"], list), "kv_cache: caches is not a list")
    for name in plan["caches"]:
        check_name(name, "kv_cache input")
    capacities = plan.get("capacities")   # absent in artifacts written before sliding windows
    _expect(capacities is None or (isinstance(capacities, list)
                                   and len(capacities) == len(plan["caches"])
                                   and all(c is None or (_is_int(c) and c >= 1) for c in capacities)),
            "kv_cache: capacities must be one positive integer or null per cache")
    scales_for = plan.get("scales_for")   # absent in artifacts written before int8 caches
    _expect(scales_for is None or (isinstance(scales_for, list)
                                   and len(scales_for) == len(plan["caches"])
                                   and all(c is None or (isinstance(c, str) and c in plan["caches"]
                                                         and c != name)
                                           for c, name in zip(scales_for, plan["caches"]))),
            "kv_cache: scales_for must name another cache input, or be null, per cache")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_options(root: Path, manifest: dict):
    from fxforge.options import parse_options
    try:
        return parse_options(manifest["options"])
    except TensorParallelError:
        raise   # a tensor-parallel artifact loaded outside its process group: say that
    except (FxforgeError, TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact {root}: manifest.json: bad options: {exc}") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each in memory of its own. safetensors maps the file
    once for all of its tensors, so one still in use after lowering (an embedding table, a
    norm) would keep every page packing read resident beside the packed copies (measured in
    bench/RESULTS.md's tensor-parallel record)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as stored:
        return {name: stored.get_tensor(name).clone() for name in stored.keys()}


def link_constants(root: Path, manifest: dict, constants: dict) -> None:
    """Every constant must have a dtype fxforge reads; tied weights are stored once, and each
    alias names another constant of the weights file."""
    for name, tensor in constants.items():
        if tensor.dtype not in DTYPES.values():
            raise ArtifactError(f"artifact {root}: weight {short_repr(name)} has unsupported dtype "
                                f"{tensor.dtype}")
    for alias, canonical in manifest["aliases"].items():
        if canonical not in constants:
            raise ArtifactError(f"artifact {root}: alias {alias} names {canonical}, which is not "
                                "in the weights file")
        constants[alias] = constants[canonical]


def check_tuning_bundle(root: Path, path: Path) -> None:
    from fxforge.autotune.cache_format import bundle_problem
    problem = bundle_problem(path)
    if problem:
        raise ArtifactError(f"artifact {root}: {path.name} {problem}")


def check_graph_inputs(root: Path, ir, step_ir, manifest: dict,
                       signature: list[TensorSignature]) -> None:
    """The graphs' inputs must be the manifest's: the inputs are checked against the manifest
    at each call, and kernels are built from what the graphs say, so the two must agree. A step
    graph's further inputs must be the KV-cache position and caches in the manifest's order:
    the runtime passes them by position."""
    graphs = [("graph.json", ir, [])]
    if step_ir is not None:
        plan = manifest["kv_cache"]
        graphs.append(("step_graph.json", step_ir, [plan["cache_pos"], *plan["caches"]]))
    for file, graph, extra in graphs:
        placeholders = graph.placeholders()
        names = [p.name for p in placeholders[len(signature):]]
        if len(placeholders) < len(signature) or names != extra:
            raise ArtifactError(f"artifact {root}: {file} has inputs "
                                f"{[p.name for p in placeholders]}, the manifest "
                                f"{[s.name for s in signature]} (+ {extra})")
        renamed: dict[str, str] = {}
        # Symbols first: an input's size may derive from a later input's (``2*seq``, ``seq``).
        for symbols_only in (True, False):
            for node, entry in zip(placeholders, signature):
                problem = _input_mismatch(node.meta.get(META_KEY), entry, renamed, symbols_only)
                if problem:
                    raise ArtifactError(f"artifact {root}: {file}'s input {node.name} {problem}")


def _input_mismatch(meta: Any, entry: TensorSignature, renamed: dict[str, str],
                    symbols_only: bool = False) -> str:
    """Why a graph input's metadata is not the manifest's entry, or ''. ``renamed`` collects
    graph symbol -> manifest name (``s27`` -> ``seq``), one to one; ``symbols_only``: compare
    the sizes that are single symbols only."""
    if not isinstance(meta, TensorMeta):
        return "has no tensor metadata"
    if meta.dtype != entry.dtype or meta.rank != len(entry.shape):
        return f"is {meta.describe()}, the manifest says {entry.describe()}"
    for dim, want in zip(meta.shape, entry.shape):
        if isinstance(dim, sympy.Symbol) and isinstance(want, sympy.Symbol):
            if renamed.setdefault(str(dim), str(want)) != str(want) or \
                    list(renamed.values()).count(str(want)) != 1:
                return f"has size {dim} where the manifest says {want} (renamed inconsistently)"
            continue
        if symbols_only:
            continue
        if isinstance(dim, sympy.Expr) and all(str(s) in renamed for s in dim.free_symbols):
            dim = dim.subs({s: sympy.Symbol(renamed[str(s)]) for s in dim.free_symbols})
        if str(dim) != str(want):
            return f"has size {dim} where the manifest says {want}"
    return ""
