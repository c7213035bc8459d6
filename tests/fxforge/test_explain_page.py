"""The explain page (fxforge/explain_page.py): boxes are the kernels a call runs, with their
paths, shares of one timed call and of build time; layout ops are folded into edges; a block
repeated back to back is shown once with its count; the file needs nothing from outside. A
slow test opens it in a real headless browser."""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import fxforge
from fxforge.examples.small_gpt import GPTConfig, SmallGPT
from fxforge.explain_page import block_label, repeated_block, time_nodes


def _data(page: str) -> dict:
    payload = re.search(r'<script type="application/json" id="fxf-data">(.*?)</script>', page, re.S)
    return json.loads(payload.group(1).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def gpt_page():
    torch.manual_seed(int(torch.randint(0, 2**30, ())))
    model = SmallGPT(GPTConfig(n_layer=3)).eval()
    report = fxforge.explain(model, torch.randint(0, 100, (1, 12)))
    return report, report.to_html()


def test_the_layers_are_one_block_shown_once_with_their_count(gpt_page):
    report, page = gpt_page
    graph = _data(page)["graphs"][0]
    (block,) = graph["blocks"]
    assert block["count"] == 3 and block["label"] == "blocks.0–2"
    kinds = [graph["units"][i]["op"] for i in block["first"]]
    assert sum(op.startswith("linear") for op in kinds) == 4   # qkv, out, fc, proj
    assert any("attention" in op for op in kinds)
    for members in block["members"]:   # each instance: the same work, other weights
        assert [graph["units"][i]["op"] for i in members] == kinds


def test_every_kernel_is_a_box_with_its_path_and_layout_folded_into_edges(gpt_page):
    report, page = gpt_page
    graph = _data(page)["graphs"][0]
    kernels = [u for u in graph["units"] if u["kind"] == "kernel"]
    assert len(kernels) == report.graphs[0].kernels
    chosen = {c.node: c.path for c in report.graphs[0].choices}
    for unit in kernels:
        if unit["name"] in chosen:
            assert unit["path"] == chosen[unit["name"]]
        assert not unit["op"].startswith(("view", "permute", "reshape", "getitem"))
    vias = {op for u in kernels for i in u["inputs"] for op in i["via"]}
    assert vias and vias <= {"reshape", "view", "permute", "transpose", "expand", "split_with_sizes",
                             "t", "unsqueeze", "squeeze", "split", "contiguous", "select",
                             "slice", "narrow", "unbind", "as_strided", "flatten"}, vias
    linears = [u for u in kernels if u["op"].startswith("linear")]
    assert all(u["weights"] for u in linears)   # a packed weight is still named on its box


def test_shares_are_of_one_call_and_of_the_build(gpt_page):
    _, page = gpt_page
    graph = _data(page)["graphs"][0]
    assert graph["run_total"] > 0 and graph["build_total"] > 0
    assert sum(u["run"] for u in graph["units"]) == pytest.approx(graph["run_total"])
    assert all(u["run"] == 0 for u in graph["units"] if u["kind"] != "kernel")
    assert any(row[0] == ["passes"] for row in graph["profile"])


def test_the_page_is_one_offline_file_with_a_search_box(gpt_page):
    _, page = gpt_page
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))
    Tags().feed(page)
    assert ("input", {"id": "search", "type": "search", "placeholder":
                      "search kernels, ops, weights, paths", "aria-label": "search"}) in tags
    for tag, attrs in tags:
        assert "src" not in attrs and not attrs.get("href", "").startswith(("http", "//"))
    assert not re.search(r"\b(fetch|XMLHttpRequest|import\()", page)
    assert page.count("</script>") == 2   # the data cannot close its own tag early


def test_repeated_block_finds_the_longest_cover_and_none_without_repeats():
    layer = ["norm", "qkv", "attn", "out", "norm", "up", "down"]
    assert repeated_block(["embed", *layer * 5, "head"]) == (1, 7, 5)
    assert repeated_block(list("abcdefg")) is None
    assert repeated_block(["x", "x"]) is None   # a block is two boxes at least
    start, period, count = repeated_block(list("zab") + list("cdcdcd") + list("ab"))
    assert (period, count) == (2, 3) and start == 3


def test_block_label_needs_consecutive_indices():
    units = [{"weights": [{"name": f"model.layers.{i}.mlp.weight", "shape": ""}]} for i in (4, 5, 7)]
    assert block_label(units, [[0], [1]]) == "model.layers.4–5"
    assert block_label(units, [[0], [2]]) == ""


def test_time_nodes_uses_the_clock_it_is_given():
    ticks = itertools.count()
    gm = torch.fx.symbolic_trace(lambda x: (x + 1).relu())
    seconds = time_nodes(gm, [torch.randn(3)], clock=lambda: float(next(ticks)))
    assert set(seconds.values()) == {1.0} and len(seconds) == len(gm.graph.nodes)


def _browser():
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_the_page_renders_in_a_headless_browser(gpt_page, tmp_path):
    """A real browser runs the page's script: the DOM it leaves holds every box and the block,
    and the screenshot is not blank. (``make browser`` installs Debian's chromium-headless-shell.)"""
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium: make browser")
    Image = pytest.importorskip("PIL.Image")
    report, page = gpt_page
    path = tmp_path / "explain.html"
    path.write_text(page)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1200,1000"]
    dom = subprocess.run([*flags, "--dump-dom", f"file://{path}#open"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    graph = _data(page)["graphs"][0]
    shown = len(graph["units"]) - sum(len(b["first"]) * (b["count"] - 1) for b in graph["blocks"])
    assert f'data-ready="{shown}"' in dom
    assert len(re.findall(r'class="unit ', dom)) == shown
    assert re.search(r'<details class="block" open="">\s*<summary><span class="count">×3</span>', dom)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", f"file://{path}#open"], capture_output=True,
                   timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1000)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50   # text, boxes, bars: not blank
