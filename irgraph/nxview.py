"""A networkx view of the IR for analysis (reachability, cycles, fusion-group checks)."""
from __future__ import annotations

import networkx as nx

from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY


def to_networkx(ir: IRGraph) -> nx.DiGraph:
    """Nodes keyed by fx node name, with ``op``, ``target`` and ``meta``; edges follow data."""
    g = nx.DiGraph()
    for node in ir.gm.graph.nodes:
        target = op_name(node.target) if node.op == "call_function" else str(node.target)
        g.add_node(node.name, op=node.op, target=target, meta=node.meta.get(META_KEY))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def would_create_cycle(g: nx.DiGraph, group: set[str]) -> bool:
    """True if merging ``group`` into one node would make the graph cyclic.

    A merge is cyclic exactly when a path leaves the group and comes back into it.
    """
    outside_succ = {s for n in group for s in g.successors(n)} - group
    reach: set[str] = set()
    for start in outside_succ:
        if start not in reach:
            reach |= nx.descendants(g, start) | {start}
    return bool(reach & group)
