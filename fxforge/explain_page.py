"""The explain page: what fxforge runs for a model, as one self-contained HTML file to read.

The boxes are what runs: each kernel (a fusion group, a linear, an attention) and each op left
on ATen, in the order the lowered graph calls them, with its kernel path, its share of one
measured call (:func:`time_nodes`) and of the time spent building it
(``KernelChoice.seconds``). Layout ops (views, permutes, ``getitem`` of a split) launch nothing:
they are folded into the edges, which carry the shape that arrives. Constants are attributes of
the box that reads them. A run of identical boxes repeated back to back (a transformer's layers)
is shown once, as a block with its count (:func:`repeated_block`). The page holds its data as
JSON and draws it with a small inline script: a search box filters the boxes; nothing is
fetched, so the file works offline.
"""
from __future__ import annotations

import html
import json
import logging
import re
import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.explain_page_assets import PAGE_CSS, PAGE_SCRIPT

log = logging.getLogger("fxforge")

# call_method names fx writes for views of a lowered graph (``reshape`` of a contiguous value)
_LAYOUT_METHODS = frozenset({"view", "reshape", "permute", "transpose", "expand", "split",
                             "split_with_sizes", "unsqueeze", "squeeze", "flatten", "t",
                             "contiguous", "unbind", "narrow", "select", "as_strided"})


def time_nodes(gm: fx.GraphModule, args: Sequence[Any],
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds each node of ``gm`` took in one call on ``args`` (``clock`` injectable)."""
    seconds: dict[str, float] = {}

    class _Timed(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            start = clock()
            out = super().run_node(node)
            seconds[node.name] = clock() - start
            return out

    with torch.no_grad():
        _Timed(gm).run(*args)
    return seconds


def time_kernels(compiled: Any, inputs: tuple, graphs: list, reports: list) -> None:
    """Each graph's lowered nodes timed over one call of the model (the graph's own inputs of
    that call); a graph the call does not reach keeps no times."""
    from fxforge.compiler import observing_calls
    with observing_calls() as calls, torch.no_grad():
        compiled(*inputs)
    seen: set[int] = set()
    for graph, args, _ in calls:
        if id(graph) in seen or graph not in graphs:
            continue
        seen.add(id(graph))
        report = reports[graphs.index(graph)]
        runtime = [args[i] for i in graph.runtime_positions]
        try:
            report.run_seconds = time_nodes(graph.lowered.gm, runtime)
        except Exception as exc:   # a report, not a compile: say so and go on
            log.warning("fxforge.explain: could not time graph %d's kernels (%s: %s)",
                        report.index, type(exc).__name__, exc)


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dims = "×".join(str(d) for d in value.shape) or "scalar"
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dims} {dtype}"
    if isinstance(value, (tuple, list)):
        return ", ".join(_shape(v) for v in value if v is not None)
    return type(value).__name__ if value is not None else ""


def _is_layout(node: fx.Node) -> bool:
    """A call that launches nothing (what ``kernel_count`` does not count)."""
    from fxforge.backends.kernel_lowering import launches
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    return node.op == "call_function" and not launches(node.target)


def _op_label(node: fx.Node, choice: Any) -> str:
    """What a box computes, shortly: ``linear 576→960``, ``fused 2 ops: add, rms_norm``."""
    name = choice.op if choice is not None else (
        getattr(node.target, "__name__", None) or str(node.target))
    name = name.replace("fxforge.", "").replace("aten.", "").replace(".default", "")
    if name == "linear":
        inputs = [a.meta.get("val") for a in node.all_input_nodes]
        out = node.meta.get("val")
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(out, torch.Tensor):
            name = f"linear {inputs[0].shape[-1]}→{out.shape[-1]}"
    return name


def _ir_constants(ir: Any, node: Optional[fx.Node]) -> list[dict]:
    """The constants IR node ``node`` reads (a kernel that packed them holds them itself)."""
    from fxforge.irgraph.capture import WEIGHT_NAME_KEY
    from fxforge.irgraph.query import alias_root
    out = []
    for arg in node.all_input_nodes if node is not None else ():
        root = alias_root(arg)
        if root.op == "get_attr":
            value = getattr(ir.gm, str(root.target), None)
            out.append({"name": root.meta.get(WEIGHT_NAME_KEY) or str(root.target),
                        "shape": _shape(value) if value is not None else _shape(arg.meta.get("val"))})
    return out


class _Units:
    """The lowered graph read as boxes (module docstring): one builder per graph."""

    def __init__(self, gm: fx.GraphModule, choices: Sequence[Any], run: dict[str, float],
                 ir: Any = None):
        self.gm, self.run, self.ir = gm, run, ir
        self.ir_nodes = {n.name: n for n in ir.gm.graph.nodes} if ir is not None else {}
        self.choices = {c.node: c for c in choices}
        self.units: list[dict] = []
        self.source: dict[fx.Node, tuple[Optional[int], list[str]]] = {}   # value -> (box, layout ops)
        self.constants: dict[fx.Node, dict] = {}

    def build(self) -> list[dict]:
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                self.constants[node] = self._constant(node)
            elif node.op == "placeholder":
                self._add(node, "input", node.name, "graph input", None)
            elif node.op == "output":
                self._add(node, "output", "output", "graph output", None)
            elif _is_layout(node):
                self._fold(node)
            else:
                self._compute(node)
        return self.units

    def _constant(self, node: fx.Node) -> dict:
        from fxforge.irgraph.capture import WEIGHT_NAME_KEY
        value = getattr(self.gm, str(node.target), None)
        return {"name": node.meta.get(WEIGHT_NAME_KEY) or str(node.target), "shape": _shape(value)}

    def _fold(self, node: fx.Node) -> None:
        """A layout op: the value is its source's, reached through one more op."""
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first in self.constants:
            self.constants[node] = self.constants[first]
            return
        box, ops = self.source.get(first, (None, [])) if isinstance(first, fx.Node) else (None, [])
        name = str(node.target) if node.op == "call_method" else _op_label(node, None)
        self.source[node] = (box, ops + ([] if name == "getitem" else [name]))

    def _compute(self, node: fx.Node) -> None:
        key = node.meta.get("fxf_kernel_group") or node.meta.get("fxf_kernel_node")
        choice = self.choices.get(key) if key else None
        path = choice.path if choice is not None else (
            "partition" if node.op == "call_module" else "ATen")
        packed = (_ir_constants(self.ir, self.ir_nodes.get(key))
                  if node.meta.get("fxf_kernel_node") else [])
        self._add(node, "kernel", key or node.name, path, choice, packed)

    def _add(self, node: fx.Node, kind: str, name: str, path: str, choice: Any,
             packed: Sequence[dict] = ()) -> None:
        inputs, weights = [], []
        for arg in node.all_input_nodes:
            if arg in self.constants:
                weights.append(self.constants[arg])
            elif arg in self.source:
                box, ops = self.source[arg]
                if box is not None:
                    inputs.append({"from": box, "shape": _shape(arg.meta.get("val")),
                                   "via": ops})
        unit = {"id": len(self.units), "kind": kind, "name": name,
                "op": _op_label(node, choice) if kind == "kernel" else name, "path": path,
                "reason": getattr(choice, "reason", ""), "out": _shape(node.meta.get("val")),
                "run": self.run.get(node.name, 0.0) if kind == "kernel" else 0.0,
                "build": getattr(choice, "seconds", 0.0), "inputs": inputs,
                "weights": weights or list(packed)}
        self.units.append(unit)
        self.source[node] = (unit["id"], [])


def signature(unit: dict) -> tuple:
    """What makes two boxes the same kind of work (weights' values aside)."""
    return (unit["kind"], unit["op"], unit["path"], unit["out"],
            tuple(w["shape"] for w in unit["weights"]), len(unit["inputs"]))


def repeated_block(signatures: Sequence[Any]) -> Optional[tuple[int, int, int]]:
    """(start, period, count) of the run of one segment repeated back to back that covers
    the most boxes (at least twice, at least two boxes long), or None."""
    n, best = len(signatures), None
    for period in range(2, n // 2 + 1):
        run = 0
        for i in range(n - period - 1, -1, -1):   # run: how far signatures match period apart
            run = run + 1 if signatures[i] == signatures[i + period] else 0
            count = run // period + 1
            if count >= 2 and (best is None or count * period > best[1] * best[2]):
                best = (i, period, count)
    return best


def block_label(units: Sequence[dict], members: Sequence[Sequence[int]]) -> str:
    """``model.layers.0–29`` when the instances' weights are named by one indexed module
    path, else ""."""
    def indexed(ids: Sequence[int]) -> list[tuple[str, int]]:
        names = [w["name"] for i in ids for w in units[i]["weights"]]
        return [(m.group(1), int(m.group(2))) for n in names
                if (m := re.match(r"(.*?)\.(\d+)\.", n))]
    first = indexed(members[0])
    if not first:
        return ""
    prefix = Counter(p for p, _ in first).most_common(1)[0][0]
    indices = [min((i for p, i in indexed(ids) if p == prefix), default=None) for ids in members]
    if None in indices or indices != list(range(indices[0], indices[0] + len(indices))):
        return ""
    return f"{prefix}.{indices[0]}–{indices[-1]}"


def graph_page_data(report: Any) -> dict:
    """One graph's boxes and blocks for the page."""
    units = _Units(report.lowered.gm, report.choices, report.run_seconds, report.ir).build()
    kernels = [u for u in units if u["kind"] == "kernel"]
    block = repeated_block([signature(u) for u in kernels])
    blocks = []
    if block is not None:
        start, period, count = block
        ids = [u["id"] for u in kernels[start:start + period * count]]
        members = [ids[i * period:(i + 1) * period] for i in range(count)]
        blocks.append({"first": ids[:period], "count": count, "members": members,
                       "label": block_label(units, members)})
    return {"index": report.index, "backend": report.backend, "kernels": report.kernels,
            "nodes_before": report.nodes_before, "nodes_after": report.nodes_after,
            "units": units, "blocks": blocks,
            "run_total": sum(u["run"] for u in units), "build_total": sum(u["build"] for u in units),
            "profile": report.profile_rows}


def render_page(report: Any) -> str:
    """The whole page: data, style and script inline (module docstring)."""
    data = {"summary": report.summary_line(), "options": {k: v for k, v in report.options.items()
                                                        if v not in (None, False)},
            "warnings": report.warnings, "graphs": [graph_page_data(g) for g in report.graphs],
            "text": report.text}
    payload = json.dumps(data, default=str).replace("</", "<\\/")   # never ends the script tag
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width\">"
            f"<title>fxforge.explain: {html.escape(report.summary_line()[:80])}</title>\n"
            f"<style>{PAGE_CSS}</style></head>\n<body>\n<header><h1>fxforge.explain</h1>"
            "<input id=\"search\" type=\"search\" placeholder=\"search kernels, ops, weights, paths\""
            " aria-label=\"search\"><span id=\"matches\"></span></header>\n<main id=\"page\"></main>\n"
            f"<script type=\"application/json\" id=\"fxf-data\">{payload}</script>\n"
            f"<script>{PAGE_SCRIPT}</script>\n</body></html>\n")
