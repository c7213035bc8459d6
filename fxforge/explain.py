"""``fxforge.explain``: what fxforge did to a model, as data, text, a picture and a log line.

The model is compiled on the example inputs inside :func:`fxforge.compiler.recording`, so every
graph dynamo hands to fxforge is seen as built: captured IR, optimized IR with its pass history
and fusion groups, and the lowered form with the backend's kernel choices and eager fallbacks.
The model is also run once eagerly under a dispatch mode that counts the ATen kernels it
launches, so "kernels per forward" can be compared with what fxforge launches.
"""
from __future__ import annotations

import logging
import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from fxforge import graph_cache
from fxforge.api import compile as fxforge_compile
from fxforge.backends import Fallback
from fxforge.compiler import recording
from fxforge.irgraph import IRGraph, groups, op_name
from fxforge.irgraph.query import is_view_op
from fxforge.passes.base import PassStats

if TYPE_CHECKING:
    from fxforge.backends.kernel_lowering import KernelChoice

log = logging.getLogger("fxforge")

# Ops that launch no compute kernel although their schema shows no alias: they only allocate,
# describe, or (``_unsafe_view``, what ``reshape`` of a fresh copy ends in) re-view memory.
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                        "sym_size", "sym_stride", "sym_numel", "_unsafe_view"})


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """True unless ``func`` is a view (its first result aliases an input without writing it)
    or only allocates. In-place and ``out=`` ops alias too, but they write: they count."""
    if func.overloadpacket.__name__ in _NO_KERNEL:
        return False
    returns = func._schema.returns
    alias = returns[0].alias_info if returns else None
    return alias is None or alias.is_write


class _KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.ops[op_name(func)] += 1
        return func(*args, **(kwargs or {}))


def count_eager_kernels(fn: Callable, *inputs: Any) -> Counter:
    """The ATen kernels one eager call of ``fn(*inputs)`` launches, by op (views not counted)."""
    counter = _KernelCounter()
    with torch.no_grad(), counter:
        fn(*inputs)
    return counter.ops


def _is_fallback_path(path: str) -> bool:
    return "fallback" in path.lower()


def _short(op: str) -> str:
    """``aten.native_layer_norm.default`` -> ``native_layer_norm``."""
    parts = op.split(".")
    return parts[1] if len(parts) == 3 and parts[0] in ("aten", "prims", "fxforge") else op


@dataclass
class GraphReport:
    """One graph fxforge compiled: before/after passes, fusion groups, kernels and fallbacks."""

    index: int
    backend: str
    partitions: int
    nodes_before: int
    nodes_after: int
    ops_before: Counter
    ops_after: Counter
    passes: list[PassStats]
    groups: dict[str, list[str]]  # group name -> its ops (short names, getitem left out)
    group_nodes: dict[str, list[str]]  # group name -> its IR node names
    choices: list["KernelChoice"]
    fallbacks: list[Fallback]
    kernels: int  # kernels one call of this graph launches
    paths: dict[str, int]  # kernels by path ("generated C++ (AVX2)", "ATen", ...)
    ir: Optional[IRGraph] = field(default=None, repr=False, compare=False)
    tuning: list = field(default_factory=list)  # autotune Picks: config per tuned kernel
    lowered: Any = field(default=None, repr=False, compare=False)   # the LoweredGraph
    run_seconds: dict = field(default_factory=dict)  # lowered node -> seconds of one timed call
    profile_rows: list = field(default_factory=list)  # (phase path, seconds): compile time

    @property
    def fallback_nodes(self) -> set[str]:
        """IR nodes that run eagerly: unsupported ops, and members of groups/ops whose kernel
        could not be built."""
        names = {fb.node for fb in self.fallbacks}
        for choice in self.choices:
            if _is_fallback_path(choice.path):
                names.update(self.group_nodes.get(choice.node, [choice.node]))
        return names


def _kernel_paths(ir: IRGraph, backend: str, choices: list["KernelChoice"],
                  fallbacks: list[Fallback], kernels: int) -> dict[str, int]:
    """Kernels by path: one per non-fallback choice; what is left runs on ATen, split into the
    eager fallbacks (unsupported ops) and the ops the backend left on ATen on purpose."""
    paths: Counter[str] = Counter(c.path for c in choices if not _is_fallback_path(c.path))
    by_name = {n.name: n for n in ir.gm.graph.nodes}
    eager = sum(1 for fb in fallbacks if fb.node in by_name and _computes(by_name[fb.node].target))
    rest = kernels - sum(paths.values())
    if eager and rest > 0:
        paths["ATen (eager fallback)"] = min(eager, rest)
        rest -= paths["ATen (eager fallback)"]
    if rest > 0:
        paths["ATen (reference backend)" if backend == "reference" else "ATen"] = rest
    return dict(paths)


def _computes(target: Any) -> bool:
    if target is operator.getitem or is_view_op(target):
        return False
    return not isinstance(target, torch._ops.OpOverload) or launches_kernel(target)


def _call_ops(ir: IRGraph) -> Counter:
    return Counter(op_name(n.target) for n in ir.gm.graph.nodes if n.op == "call_function")


def graph_report(index: int, compiled: Any) -> GraphReport:
    """Build the report of one :class:`fxforge.compiler.CompiledGraph`."""
    from fxforge.backends.kernel_lowering import kernel_count
    # The IR as optimized: lowering works on copies (partitioning included), never on it.
    ir, lowered = compiled.ir, compiled.lowered
    group_members = groups(ir)
    kernels = lowered.kernels if lowered.kernels is not None else kernel_count(ir.gm)
    choices, fallbacks = list(lowered.choices), list(lowered.fallbacks)
    return GraphReport(
        index=index, backend=lowered.backend, partitions=lowered.partitions,
        nodes_before=len(compiled.captured.gm.graph.nodes), nodes_after=len(ir.gm.graph.nodes),
        ops_before=_call_ops(compiled.captured), ops_after=_call_ops(ir),
        passes=list(ir.info.get("passes", [])),
        groups={name: [_short(op_name(n.target)) for n in nodes if n.target is not operator.getitem]
                for name, nodes in group_members.items()},
        group_nodes={name: [n.name for n in nodes] for name, nodes in group_members.items()},
        choices=choices, fallbacks=fallbacks, kernels=kernels,
        paths=_kernel_paths(ir, lowered.backend, choices, fallbacks, kernels), ir=ir,
        tuning=list(getattr(compiled, "tuning", [])), lowered=lowered,
        profile_rows=[(list(path), p.seconds) for path, p in compiled.profile.phases.items()]
        if getattr(compiled, "profile", None) is not None else [])


@dataclass
class ExplainReport:
    """What :func:`explain` found; ``str(report)`` is the readable summary."""

    graphs: list[GraphReport]
    eager_ops: Optional[Counter]  # ATen kernels of one eager forward, by op (None: not counted)
    options: dict
    warnings: list[str] = field(default_factory=list)  # fxforge's warnings while compiling
    compiled: Any = field(default=None, repr=False, compare=False)  # the fxforge.compile result

    @property
    def kernels(self) -> int:
        """Kernels fxforge launches per forward (each graph once)."""
        return sum(g.kernels for g in self.graphs)

    @property
    def eager_kernels(self) -> Optional[int]:
        return None if self.eager_ops is None else sum(self.eager_ops.values())

    @property
    def paths(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for g in self.graphs:
            total.update(g.paths)
        return dict(total)

    @property
    def fallbacks(self) -> list[tuple[int, str, str, str]]:
        """(graph, node, op, reason) of every op or group that runs eagerly."""
        out = [(g.index, fb.node, fb.op, fb.reason) for g in self.graphs for fb in g.fallbacks]
        out += [(g.index, c.node, c.op, c.reason) for g in self.graphs for c in g.choices
                if _is_fallback_path(c.path)]
        return out

    def summary_line(self) -> str:
        eager = "" if self.eager_kernels is None else f" (eager {self.eager_kernels})"
        paths = ", ".join(f"{n} {p}" for p, n in sorted(self.paths.items(), key=lambda kv: -kv[1]))
        return (f"fxforge: {self.kernels} kernels per call{eager}: {paths or 'none'}; "
                f"{len(self.fallbacks)} fallbacks")

    @property
    def text(self) -> str:
        return render_text(self)

    def __str__(self) -> str:
        return self.text

    def to_svg(self) -> str:
        from fxforge.explain_svg import render_svg
        return render_svg(self.graphs)

    def to_html(self) -> str:
        """The explain page (``fxforge/explain_page.py``): one self-contained file."""
        from fxforge.explain_page import render_page
        return render_page(self)

    def save(self, path: str | Path) -> Path:
        """Write the report as ``.svg``, ``.html``/``.htm`` or ``.txt``, chosen by the suffix."""
        path = Path(path)
        render = {".svg": self.to_svg, ".html": self.to_html, ".htm": self.to_html,
                  ".txt": lambda: self.text + "\n"}.get(path.suffix.lower())
        if render is None:
            raise ValueError(f"cannot save an explain report as {path.suffix or 'no suffix'!r}: "
                             "use .svg, .html or .txt")
        path.write_text(render(), encoding="utf-8")
        return path


def _table(rows: list[tuple], header: tuple) -> list[str]:
    """Left-aligned text columns (numbers right-aligned), two spaces apart."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row, raw):
        return "  ".join(c.rjust(w) if isinstance(v, (int, float)) else c.ljust(w)
                         for c, w, v in zip(row, widths, raw)).rstrip()
    return [line(cells[0], header)] + [line(c, r) for c, r in zip(cells[1:], rows)]


def _op_changes(g: GraphReport) -> str:
    diff = Counter(g.ops_after)
    diff.subtract(g.ops_before)
    changes = sorted(((_short(op), n) for op, n in diff.items() if n), key=lambda kv: (kv[1], kv[0]))
    return ", ".join(f"{n:+d} {op}" for op, n in changes) or "none"


def _graph_text(g: GraphReport) -> list[str]:
    calls_before, calls_after = sum(g.ops_before.values()), sum(g.ops_after.values())
    lines = [f"== graph {g.index}: {g.nodes_before} nodes ({calls_before} ops) captured -> "
             f"{g.nodes_after} nodes ({calls_after} ops) optimized; backend {g.backend!r}, "
             f"{g.partitions} partition{'s' * (g.partitions != 1)}", "passes:"]
    rows = [(p.name, round(p.seconds * 1e3, 1), f"{p.nodes_before} -> {p.nodes_after}",
             p.error or ", ".join(f"{k}={v}" for k, v in p.counts.items() if v) or "-")
            for p in g.passes]
    lines += ["  " + row for row in _table(rows, ("pass", "ms", "nodes", "changes"))]
    lines.append(f"op changes: {_op_changes(g)}")
    lines.append(f"{len(g.groups)} fusion group{'s' * (len(g.groups) != 1)}"
                 + (":" if g.groups else ""))
    by_group = {c.node: c for c in g.choices}
    for name, ops in g.groups.items():
        choice = by_group.get(name)
        path = f"  -> {choice.path}" if choice else ""
        lines.append(f"  {name} ({len(ops)} ops): {', '.join(ops)}{path}")
    lines.append("kernels by path:")
    lines += ["  " + row for row in _table(sorted(g.paths.items(), key=lambda kv: -kv[1]),
                                           ("path", "kernels"))]
    if g.backend == "reference":
        lines.append("  (the reference backend runs every op on ATen, one kernel per op)")
    op_choices = [c for c in g.choices if not _is_fallback_path(c.path) and c.node not in g.groups]
    if op_choices:
        lines.append("kernel choices:")
        lines += [f"  {c.node} ({_short(c.op)}): {c.path}" + (f" - {c.reason}" if c.reason else "")
                  for c in op_choices]
    eager = [(fb.node, fb.op, fb.reason) for fb in g.fallbacks]
    eager += [(c.node, c.op, f"{c.path}: {c.reason}") for c in g.choices if _is_fallback_path(c.path)]
    lines.append(f"eager fallbacks: {len(eager) or 'none'}")
    lines += [f"  {node} ({op}): {reason}" for node, op, reason in eager]
    lines.append(f"kernels per call of this graph: {g.kernels}")
    return lines + _weights_text(g.ir) + _tuning_text(g.tuning)


def _weights_text(ir) -> list[str]:
    """One row per linear with a constant weight: the model's names for it, its weight format
    (``irgraph/weight_format.py``), K x N and the bytes it holds (codes, scales, offsets); under
    ``quantize="auto"`` also its measured accuracy change and time per token."""
    from fxforge.irgraph.capture import WEIGHT_NAME_KEY
    from fxforge.irgraph.query import alias_root
    from fxforge.irgraph.views import Linear
    from fxforge.irgraph.weight_format import weight_format
    from fxforge.passes.quantize_auto import INFO_KEY
    from fxforge.quant_report import explain_cells, explain_header, explain_summary
    rows, total, auto = [], 0, ir.info.get(INFO_KEY)
    for node in ir.gm.graph.nodes:
        linear = Linear.of(node)
        if linear is None or not isinstance(linear.weight, fx.Node):
            continue
        root = alias_root(linear.weight)
        if root.op != "get_attr":
            continue
        fmt = weight_format(linear.weight_format)
        tensors = [t for t in (linear.weight, linear.scales, linear.offsets) if t is not None]
        nbytes = sum(getattr(ir.gm, alias_root(t).target).nbytes for t in tensors)
        shape = linear.weight.meta["val"].shape
        k = fmt.in_features(linear.weight.meta["val"]) if fmt.code_dtype is not None else shape[0]
        name = root.meta.get(WEIGHT_NAME_KEY) or root.target
        rows.append((node.name, fmt.name, f"{k}x{shape[1]}", nbytes, *explain_cells(auto, name),
                     name[:70]))
        total += nbytes
    if not rows:
        return []
    header = ("node", "format", "K x N", "bytes", *explain_header(auto), "weights")
    return [f"linear weights: {len(rows)}, {total / 1e6:.3f} MB"] + explain_summary(auto) + \
        ["  " + row for row in _table(rows, header)]


def _tuning_text(picks: list) -> list[str]:
    """One line per tuned kernel: its config, where it came from, the gain over its default."""
    if not picks:
        return []
    lines = [f"autotuning: {len(picks)} kernel{'s' * (len(picks) != 1)}"]
    for pick in picks:
        result = pick.result
        config = result.describe(pick.config) if result else pick.config.describe()
        detail = (f"{result.gain:.2f}x over default ({result.describe(result.default)}), "
                  f"measured {result.measured} of {result.total}, {result.pruned} pruned"
                  if result else pick.reason)
        lines.append(f"  {pick.task.label()}: {config} [{pick.source}] {detail}".rstrip())
    return lines


def render_text(report: ExplainReport) -> str:
    n = len(report.graphs)
    eager = "not counted" if report.eager_kernels is None else str(report.eager_kernels)
    lines = [f"fxforge.explain: {n} graph{'s' * (n != 1)}"
             + (" (dynamo graph breaks between them)" if n > 1 else "")
             + f"; backend option {report.options.get('backend')!r}",
             f"kernels per forward: fxforge {report.kernels}, eager {eager}", ""]
    for g in report.graphs:
        lines += _graph_text(g) + [""]
    listed = [reason for *_, reason in report.fallbacks if reason]
    warnings = [w for w in report.warnings if not any(reason in w for reason in listed)]
    if warnings:  # those not already listed as a fallback: failed graphs or partitions
        lines.append(f"other fxforge warnings while compiling ({len(warnings)}):")
        lines += [f"  {message}" for message in warnings]
    if report.eager_ops:
        top = ", ".join(f"{_short(op)} x{k}" for op, k in report.eager_ops.most_common(8))
        lines.append(f"eager kernels by op: {top}")
    lines.append(report.summary_line())
    return "\n".join(lines)


class _WarningCollector(logging.Handler):
    """Keeps the warnings fxforge logs while compiling (a graph that failed to compile, a
    partition or kernel that could not be built): the report repeats them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def explain(model: Callable, example_inputs: Sequence[Any] = (), *, count_eager: bool = True,
            dynamic: Optional[bool] = None, **options: Any) -> ExplainReport:
    """Compile ``model`` with fxforge on ``example_inputs`` and report what happened.

    Options are those of :func:`fxforge.compile`. ``count_eager`` also runs the model once
    eagerly to count its ATen kernels. The summary is logged at INFO on ``fxforge``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs:
        raise ValueError("fxforge.explain needs example inputs: it compiles and runs the model on them")
    warnings = _WarningCollector()
    fxforge_log = logging.getLogger("fxforge")
    fxforge_log.addHandler(warnings)
    try:
        # the report tells what the passes did: a graph from the graph cache ran none
        with recording() as compiled_graphs, graph_cache.disabled():
            compiled = fxforge_compile(model, inputs, dynamic=dynamic, **options)
    finally:
        fxforge_log.removeHandler(warnings)
    if not compiled_graphs:
        log.warning("fxforge.explain: fxforge compiled no graph (a graph that fails to compile "
                    "runs eagerly, and the warnings say why; or the model had nothing to compile)")
    eager_ops = count_eager_kernels(model, *inputs) if count_eager else None
    from fxforge.explain_page import time_kernels
    reports = [graph_report(i, g) for i, g in enumerate(compiled_graphs)]
    time_kernels(compiled, inputs, compiled_graphs, reports)
    report = ExplainReport(reports, eager_ops, compiled.options.to_dict(), warnings.messages,
                           compiled)
    log.info("%s", report.summary_line())
    return report

