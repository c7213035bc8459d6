"""The picture of ``fxforge.explain``: each optimized graph as a layered SVG drawing.

Nodes are the IR's call nodes (``getitem`` is drawn through, as an edge from the producer),
edges follow data, rows are networkx topological generations (no graphviz binary needed).
Members of a fusion group share one fill colour (a legend names each group and its ops);
nodes that run eagerly as fallbacks get a red outline; matmul and attention nodes a marker.
A graph of more than :data:`MAX_NODES` call nodes is drawn as a summary: each fusion group
becomes one node and view ops are drawn through; what is still over the limit is cut, and the
drawing says so.
"""
from __future__ import annotations

import colorsys
import operator
from typing import Any, Optional, Sequence
from xml.sax.saxutils import escape, quoteattr

import networkx as nx
import torch
import torch.fx as fx

from fxforge.irgraph import GROUP_KEY, op_name
from fxforge.irgraph.query import is_view_op, view_source

MAX_NODES = 400
MAX_PER_ROW = 16
MAX_LEGEND = 40
BOX_W, BOX_H, GAP_X, ROW_H, MARGIN = 118, 24, 12, 46, 16
FALLBACK_STROKE = "#d00000"
MARKS = {"matmul": ("#1f4fbf", "matmul / linear"), "attention": ("#8a2be2", "attention")}

aten = torch.ops.aten
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
_ATTENTION_PREFIX = ("scaled_dot_product", "_scaled_dot_product")


def group_colour(index: int) -> str:
    """A distinct light colour per group index (golden-angle hue steps)."""
    hue = (index * 137.508) % 360 / 360
    r, g, b = colorsys.hls_to_rgb(hue, 0.78, 0.65)
    return "#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255))


def _kind(target: Any) -> str:
    name = op_name(target).split(".")
    short = name[1] if len(name) == 3 else name[-1]
    if short in _MATMUL:
        return "matmul"
    if short.startswith(_ATTENTION_PREFIX):
        return "attention"
    return "view" if is_view_op(target) else "op"


def drawing_graph(gm: fx.GraphModule, summary: bool) -> nx.DiGraph:
    """Call nodes (or, in a summary, fusion groups) as a DAG; getitem (and in a summary, view
    ops) are contracted into their producer."""
    g = nx.DiGraph()
    represents: dict[fx.Node, Optional[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem or (summary and is_view_op(node.target)):
            represents[node] = represents.get(view_source(node))
            continue
        group = node.meta.get(GROUP_KEY)
        key = f"group:{group}" if summary and group else node.name
        if key not in g:
            g.add_node(key, names=[], ops=[], group=group, kind="op")
        attrs = g.nodes[key]
        attrs["names"].append(node.name)
        attrs["ops"].append(op_name(node.target))
        if len(attrs["names"]) == 1:  # a summary's group node keeps its first member's kind
            attrs["kind"] = _kind(node.target)
        represents[node] = key
        for source in node.all_input_nodes:
            src = represents.get(source)
            if src is not None and src != key:
                g.add_edge(src, key)
    return g


def _layout(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], int, int]:
    """Pixel centres by generation (rows of at most MAX_PER_ROW), ordered within a row by the
    mean x of their inputs to cut crossings; returns (positions, width, height)."""
    rows: list[list[str]] = []
    for generation in nx.topological_generations(g):
        generation = sorted(generation, key=lambda k: g.nodes[k]["names"][0])
        rows += [generation[i:i + MAX_PER_ROW] for i in range(0, len(generation), MAX_PER_ROW)]
    widest = max((len(r) for r in rows), default=1)
    width = 2 * MARGIN + widest * (BOX_W + GAP_X)
    pos: dict[str, tuple[float, float]] = {}
    for i, row in enumerate(rows):
        def barycentre(k: str) -> float:
            xs = [pos[p][0] for p in g.predecessors(k) if p in pos]
            return sum(xs) / len(xs) if xs else float("inf")
        row.sort(key=barycentre)
        left = MARGIN + (widest - len(row)) * (BOX_W + GAP_X) / 2
        for j, key in enumerate(row):
            pos[key] = (left + j * (BOX_W + GAP_X) + BOX_W / 2, MARGIN + i * ROW_H + BOX_H / 2)
    return pos, width, MARGIN * 2 + len(rows) * ROW_H


def _label(attrs: dict, summary: bool) -> str:
    if summary and attrs["group"]:
        return f"{attrs['group']} ({len(attrs['ops'])} ops)"
    parts = attrs["ops"][0].split(".")
    text = parts[1] if len(parts) == 3 else parts[-1]
    return text if len(text) <= 16 else text[:15] + "…"


def _node_svg(key: str, attrs: dict, x: float, y: float, fill: str, fallback: bool,
              summary: bool) -> str:
    title = escape(f"{', '.join(attrs['names'][:8])}: {', '.join(attrs['ops'][:8])}"
                   + (f" [group {attrs['group']}]" if attrs["group"] else "")
                   + (" [eager fallback]" if fallback else ""))
    stroke, stroke_w = (FALLBACK_STROKE, 3) if fallback else ("#555555", 1)
    data = f' data-node={quoteattr(key)}' + (f' data-group={quoteattr(attrs["group"])}'
                                             if attrs["group"] else "")
    cls = " ".join(c for c in ("node", "fallback" if fallback else "", attrs["kind"]) if c)
    out = [f'<g class="{cls}"{data}><title>{title}</title>',
           f'<rect x="{x - BOX_W / 2:.1f}" y="{y - BOX_H / 2:.1f}" width="{BOX_W}" height="{BOX_H}" '
           f'rx="4" fill="{fill}" stroke="{stroke}" stroke-width="{stroke_w}"/>']
    if attrs["kind"] in MARKS:
        out.append(f'<circle cx="{x - BOX_W / 2 + 8:.1f}" cy="{y:.1f}" r="4" '
                   f'fill="{MARKS[attrs["kind"]][0]}"/>')
    colour = "#888888" if attrs["kind"] == "view" else "#111111"
    out.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" fill="{colour}">'
               f'{escape(_label(attrs, summary))}</text></g>')
    return "".join(out)


def _edge_svg(start: tuple[float, float], end: tuple[float, float]) -> str:
    """A straight arrow to the next row; an edge skipping rows bows sideways so that it does
    not run through the boxes of the rows between."""
    (x1, y1), (x2, y2) = start, end
    y1, y2 = y1 + BOX_H / 2, y2 - BOX_H / 2
    if y2 - y1 <= ROW_H:
        return (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                f'stroke="#999999" marker-end="url(#arrow)"/>')
    bow = 0.75 * BOX_W
    return (f'<path d="M{x1:.1f},{y1:.1f} C{x1 + bow:.1f},{y1 + ROW_H:.1f} {x2 + bow:.1f},'
            f'{y2 - ROW_H:.1f} {x2:.1f},{y2:.1f}" fill="none" stroke="#999999" '
            'marker-end="url(#arrow)"/>')


def _legend(report: Any, colours: dict[str, str], y: float) -> tuple[list[str], float]:
    named = list(report.groups.items())
    items = [(colours[name], f"{name}: {', '.join(ops)}", "rect") for name, ops in named[:MAX_LEGEND]]
    if len(named) > MAX_LEGEND:
        items.append(("#ffffff", f"... {len(named) - MAX_LEGEND} more groups (a node's tooltip "
                      "names its group)", "rect"))
    items += [(FALLBACK_STROKE, "eager fallback (red outline)", "outline")]
    items += [(colour, text, "mark") for colour, text in MARKS.values()]
    out = []
    for colour, text, shape in items:
        if shape == "rect":
            out.append(f'<rect class="legend" x="{MARGIN}" y="{y:.1f}" width="14" height="12" '
                       f'fill="{colour}" stroke="#555555"/>')
        elif shape == "outline":
            out.append(f'<rect class="legend" x="{MARGIN}" y="{y:.1f}" width="14" height="12" '
                       f'fill="#ffffff" stroke="{colour}" stroke-width="3"/>')
        else:
            out.append(f'<circle class="legend" cx="{MARGIN + 7}" cy="{y + 6:.1f}" r="4" fill="{colour}"/>')
        text = text if len(text) <= 110 else text[:109] + "…"
        out.append(f'<text x="{MARGIN + 22}" y="{y + 10:.1f}">{escape(text)}</text>')
        y += 17
    return out, y


def graph_svg(report: Any, top: float) -> tuple[list[str], float, float]:
    """SVG elements of one :class:`fxforge.explain.GraphReport`, starting at ``top``;
    returns (elements, width, bottom)."""
    gm = report.ir.gm
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem)
    summary = calls > MAX_NODES
    g = drawing_graph(gm, summary)
    cut = 0
    if g.number_of_nodes() > MAX_NODES:
        keep = list(nx.topological_sort(g))[:MAX_NODES]
        cut = g.number_of_nodes() - len(keep)
        g = g.subgraph(keep).copy()
    colours = {name: group_colour(i) for i, name in enumerate(report.groups)}
    fallbacks = report.fallback_nodes
    heading = (f"graph {report.index}: backend {report.backend}, {calls} call nodes, "
               f"{len(report.groups)} fusion group{'s' * (len(report.groups) != 1)}, "
               f"{report.kernels} kernels per call"
               + (" (summary: groups as one node, views drawn through)" if summary else "")
               + (f"; {cut} more nodes not drawn" if cut else ""))
    out = [f'<text x="{MARGIN}" y="{top + 14:.1f}" font-weight="bold">{escape(heading)}</text>']
    legend, y = _legend(report, colours, top + 24)
    out += legend
    pos, width, height = _layout(g)
    out.append(f'<g transform="translate(0,{y:.1f})">')
    out += [_edge_svg(pos[src], pos[dst]) for src, dst in g.edges]
    for key, attrs in g.nodes(data=True):
        fill = colours.get(attrs["group"], "#f4f4f4" if attrs["kind"] == "view" else "#ffffff")
        fallback = any(name in fallbacks for name in attrs["names"])
        out.append(_node_svg(key, attrs, *pos[key], fill, fallback, summary))
    out.append("</g>")
    return out, max(width, 760), y + height


def render_svg(reports: Sequence[Any]) -> str:
    """One SVG document with every graph of an explain report, one under the other."""
    body: list[str] = []
    width, top = 760.0, 0.0
    for report in reports:
        elements, graph_width, top = graph_svg(report, top)
        body += elements
        width = max(width, graph_width)
        top += MARGIN
    if not reports:
        body.append(f'<text x="{MARGIN}" y="20">fxforge compiled no graph</text>')
        top = 40
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{top:.0f}" '
            f'viewBox="0 0 {width:.0f} {top:.0f}" font-family="monospace" font-size="11">'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
            'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#999999"/></marker>'
            f'</defs><rect width="100%" height="100%" fill="#ffffff"/>')
    return head + "\n" + "\n".join(body) + "\n</svg>\n"
