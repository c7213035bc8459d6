"""fxforge.explain: the report of what fxforge did (groups, kernels by path, fallbacks), its
text, SVG and HTML renderings, and the eager kernel counter it compares against."""
import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge import explain_svg
from fxforge.backends import register_backend
from fxforge.backends.kernel_lowering import KernelTable, lower_to_kernels
from fxforge.backends.reference import ReferenceBackend
from fxforge.explain import count_eager_kernels
from fxforge.irgraph import groups
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten
SVG = "{http://www.w3.org/2000/svg}"
PASSES = ["remove_noops", "cse", "fuse_projections", "constant_fold", "cse", "dce",
          "fuse_elementwise"]


class Block(nn.Module):
    """Pre-norm residual MLP with GELU, a final LayerNorm and a gated head: two fusion groups."""

    def __init__(self, dim=16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2, self.head = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, 8)

    def forward(self, x):
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln1(x))))
        z = self.head(self.ln2(x) * 2)
        return torch.sigmoid(z) * z


class NoSin(ReferenceBackend):
    name = "test-explain-nosin"

    def supports(self, node):
        return "sin is not supported here" if node.target is aten.sin.default else super().supports(node)


class FakeKernels(ReferenceBackend):
    """A kernel backend in miniature: each fusion group one kernel, addmm a kernel of its own."""

    name = "test-explain-kernels"

    def compile_partition(self, gm):
        def fused(sub):
            def fused_kernel(*args):
                return sub(*args)
            return fused_kernel, "test fused"
        table = KernelTable(self.name, fused)

        @table.rule(aten.addmm.default)
        def addmm(node, constant):
            return aten.addmm.default, node.args, "test matmul", "a test rule"
        lowered, _ = lower_to_kernels(gm, table)   # its choices travel with it
        return lowered


register_backend(NoSin.name, NoSin)
register_backend(FakeKernels.name, FakeKernels)


def _explain(model, x, backend="reference", **options):
    report = fxforge.explain(model, (x,), passes=PASSES, backend=backend, **options)
    with torch.no_grad():
        assert_close_to_eager(report.compiled(x), model(x))
    return report


def _svg_root(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg"
    return root


def test_groups_passes_and_reference_kernels_are_reported():
    model, x = Block().eval(), torch.randn(2, 3, 16)
    report = _explain(model, x)
    assert len(report.graphs) == 1
    graph = report.graphs[0]
    ir_groups = groups(graph.ir)
    assert len(ir_groups) == 2 and set(graph.groups) == set(ir_groups)
    for name, nodes in ir_groups.items():
        assert graph.group_nodes[name] == [n.name for n in nodes]
        assert len(graph.groups[name]) == sum(1 for n in nodes if "getitem" not in str(n.target))
    assert graph.groups["fused_1"] == ["sigmoid", "mul"]
    assert [p.name for p in graph.passes] == PASSES
    assert graph.passes[-1].counts["groups"] == 2
    # The reference backend: no kernel choices, every compute op is one ATen kernel.
    assert graph.backend == "reference" and graph.choices == [] and graph.fallbacks == []
    assert graph.paths == {"ATen (reference backend)": graph.kernels}
    assert report.eager_ops == Counter({"aten.addmm.default": 3, "aten.native_layer_norm.default": 2,
                                        "aten.add.Tensor": 1, "aten.gelu.default": 1,
                                        "aten.mul.Tensor": 2, "aten.sigmoid.default": 1})
    assert graph.kernels == report.eager_kernels == 10
    text = str(report)
    assert "2 fusion groups:" in text and "fused_1 (2 ops): sigmoid, mul" in text
    assert re.search(r"\n  ATen \(reference backend\) +10\n", text) and "eager fallbacks: none" in text
    assert "kernels per forward: fxforge 10, eager 10" in text
    assert "fuse_elementwise" in text and "groups=2" in text


def test_svg_colours_each_group_and_html_embeds_it(tmp_path):
    model, x = Block().eval(), torch.randn(2, 3, 16)
    report = _explain(model, x)
    graph = report.graphs[0]
    root = _svg_root(report.to_svg())
    nodes = root.findall(f".//{SVG}g[@data-node]")
    calls = [n for n in graph.ir.gm.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert len(nodes) == len(calls)
    corners = {(float(n.find(SVG + "rect").get("x")), float(n.find(SVG + "rect").get("y"))) for n in nodes}
    assert len(corners) == len(nodes)  # no two boxes drawn on the same spot
    legend_fills = {r.get("fill") for r in root.iter(SVG + "rect") if r.get("class") == "legend"}
    fills = {}
    for name, members in graph.group_nodes.items():
        drawn = root.findall(f".//{SVG}g[@data-group='{name}']")
        assert len(drawn) == sum(1 for m in members if not m.startswith("getitem"))
        group_fills = {g.find(SVG + "rect").get("fill") for g in drawn}
        assert len(group_fills) == 1
        fills[name] = group_fills.pop()
        assert fills[name] in legend_fills
    assert len(set(fills.values())) == len(fills) == 2
    assert len(root.findall(f".//{SVG}g[@class='node matmul']")) == 3  # three addmm marked
    html = report.to_html()   # the explain page: tests/fxforge/test_explain_page.py
    assert 'id="fxf-data"' in html and "fused_1" in html
    for suffix in (".svg", ".html", ".txt"):
        written = report.save(tmp_path / f"report{suffix}")
        assert written.read_text().strip()
    assert (tmp_path / "report.txt").read_text().strip() == report.text
    with pytest.raises(ValueError, match="use .svg, .html or .txt"):
        report.save(tmp_path / "report.png")


def test_fallback_is_listed_with_its_reason_and_outlined_red(caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    fn = lambda x: model(x).sin() * 3 + 1  # noqa: E731
    x = torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="fxforge"):
        report = _explain(fn, x, backend=NoSin.name)
    assert report.fallbacks == [(0, "sin", "aten.sin.default", "sin is not supported here")]
    assert "sin (aten.sin.default): sin is not supported here" in report.text
    assert "eager fallbacks: 1" in report.text
    assert report.graphs[0].paths.get("ATen (eager fallback)") == 1
    summary = [r.getMessage() for r in caplog.records if "kernels per call" in r.getMessage()]
    assert summary == [report.summary_line()] and summary[0].endswith("; 1 fallbacks")
    root = _svg_root(report.to_svg())
    (sin,) = root.findall(f".//{SVG}g[@data-node='sin']")
    assert "fallback" in sin.get("class") and sin.find(SVG + "rect").get("stroke") == "#d00000"
    others = [g for g in root.findall(f".//{SVG}g[@data-node]") if g.get("data-node") != "sin"]
    assert others and all("fallback" not in g.get("class") for g in others)


def test_kernel_choices_are_counted_by_path():
    model, x = Block().eval(), torch.randn(2, 3, 16)
    report = _explain(model, x, backend=FakeKernels.name)
    graph = report.graphs[0]
    assert sorted(c.path for c in graph.choices) == ["test fused"] * 2 + ["test matmul"] * 3
    # two groups and three addmm become 5 kernels; ln1 and gelu stay on ATen
    assert graph.paths == {"test fused": 2, "test matmul": 3, "ATen": 2}
    assert graph.kernels == 7 and report.eager_kernels == 10
    assert report.summary_line() == ("fxforge: 7 kernels per call (eager 10): 3 test matmul, "
                                     "2 test fused, 2 ATen; 0 fallbacks")
    assert "fused_0 (3 ops): add, native_layer_norm, mul  -> test fused" in report.text
    assert "kernel choices:\n  addmm (addmm): test matmul - a test rule\n" in report.text


def test_eager_kernel_counter_skips_views():
    x = torch.randn(5, 7)
    assert sum(count_eager_kernels(lambda t: (t + 1).relu().sum(), x).values()) == 3
    ops = count_eager_kernels(lambda t: t.t().reshape(-1)[:30].view(5, -1).exp(), x)
    assert ops == Counter({"aten.clone.default": 1, "aten.exp.default": 1})  # reshape copies
    report = fxforge.explain(lambda t: (t + 1).relu().sum(), (x,), backend="reference", passes=PASSES)
    assert report.eager_kernels == 3 and report.kernels == 3


def test_graph_breaks_give_one_report_per_graph():
    def fn(x):
        y = (x * 2).exp()
        torch._dynamo.graph_break()
        return y.tanh() + 1
    report = fxforge.explain(fn, (torch.randn(3, 4),), backend="reference", passes=PASSES)
    assert [g.index for g in report.graphs] == [0, 1]
    assert "2 graphs (dynamo graph breaks between them)" in report.text
    assert report.kernels == 4 == report.eager_kernels
    assert len(_svg_root(report.to_svg()).findall(f".//{SVG}g[@data-node]")) == 4


def test_large_graphs_are_drawn_as_a_summary(monkeypatch):
    model, x = Block().eval(), torch.randn(2, 3, 16)
    report = _explain(model, x)
    monkeypatch.setattr(explain_svg, "MAX_NODES", 6)
    root = _svg_root(report.to_svg())
    drawn = root.findall(f".//{SVG}g[@data-node]")
    assert len(drawn) == 6
    heading = "".join(root.find(SVG + "text").itertext())
    assert "summary" in heading and "more nodes not drawn" in heading
    assert all(g.get("data-node").startswith("group:") for g in drawn if g.get("data-group"))


def test_explain_needs_example_inputs():
    with pytest.raises(ValueError, match="needs example inputs"):
        fxforge.explain(nn.Linear(2, 2), ())
