"""Crafting hostile artifacts: copy a real one and rewrite its JSON as an attacker would.

The SHA-256 hashes are rewritten with the files: they live in the same unprotected manifest.
``tests/fxforge/hostile_cases.py`` holds the cases, ``test_hostile_artifacts.py`` the checks.
"""
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

Edit = Optional[Callable[[dict], None]]


class Tiny(torch.nn.Module):
    """The model of the ``tiny`` base artifact (input ``x``: float32 [2, seq, 8])."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.lin(x)) + x)


@dataclass
class Hostile:
    """What a case rewrites: graph.json, manifest.json and step_graph.json (each edited as a
    dict in place), then ``finish(folder)`` for what JSON edits cannot write; ``base`` names
    the artifact it starts from (``tiny``, or ``kv_gpt``: a ``kv_cache`` artifact)."""

    graph: Edit = None
    manifest: Edit = None
    step_graph: Edit = None
    finish: Optional[Callable] = None
    base: str = "tiny"


class Evil:
    """Unpickling this creates the marker (what ``torch.load(weights_only=False)`` would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rehash(art):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((art / name).read_bytes()).hexdigest()
                         for name in manifest["files"] if (art / name).is_file()}
    (art / "manifest.json").write_text(json.dumps(manifest))


def craft(base, folder, hostile: Hostile):
    """A copy of the artifact ``base`` in ``folder`` with ``hostile``'s edits (hashes updated)."""
    shutil.copytree(base, folder)
    for file, edit in (("graph.json", hostile.graph), ("manifest.json", hostile.manifest),
                       ("step_graph.json", hostile.step_graph)):
        if edit is not None:
            data = json.loads((folder / file).read_text())
            edit(data)
            (folder / file).write_text(json.dumps(data))
    rehash(folder)
    if hostile.finish is not None:
        hostile.finish(folder)
        rehash(folder)
    return folder


def node(graph, name):
    return next(n for n in graph["nodes"] if n["name"] == name)


def ref(name):
    return {"node": name}


def add_calls(*calls):
    """Graph edit: insert call_function nodes ``(name, target, args, kwargs)`` before the output."""
    def edit(graph):
        out = next(i for i, n in enumerate(graph["nodes"]) if n["op"] == "output")
        for offset, (name, target, args, kwargs) in enumerate(calls):
            graph["nodes"].insert(out + offset, {"name": name, "op": "call_function", "meta": None,
                                                 "target": target, "args": {"tuple": args},
                                                 "kwargs": kwargs})
    return edit


def set_shape(node_name, axis, text):
    def edit(graph):
        node(graph, node_name)["meta"]["tensor"]["shape"][axis] = text
    return edit


def rename(old, new):
    """An edit of a graph or manifest: every JSON string ``old`` becomes ``new``."""
    def edit(data):
        text = json.dumps(data).replace(json.dumps(old), json.dumps(new))
        data.clear()
        data.update(json.loads(text))
    return edit


def touch_code(marker):
    """Python source that creates ``marker`` if anything evaluates it."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


PLANTED_MODULE = "fxf_planted_payload"


def plant_module(tmp_path, monkeypatch, marker):
    """A module on sys.path whose import creates the marker (a stand-in for any importable code)."""
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / f"{PLANTED_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, PLANTED_MODULE, raising=False)
    return PLANTED_MODULE
