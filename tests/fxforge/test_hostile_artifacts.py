"""Hostile artifacts: loading one runs only fxforge's own code.

Each case starts from a real (tiny) artifact, rewrites its JSON as an attacker would (and the
SHA-256 hashes with it: they live in the same unprotected manifest), and checks that
``fxforge.load`` -- and ``python -m fxforge info`` for a representative subset -- refuses it
with an ``ArtifactError`` and that its payload did not run: every payload would create
``marker`` (or import a planted module that does) if anything evaluated it.
"""
import hashlib
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import fxforge


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.lin(x)) + x)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile") / "tiny"
    seq = torch.export.Dim("seq", min=2, max=64)
    fxforge.aot_compile(Tiny().eval(), (torch.randn(2, 5, 8),), path, dynamic_shapes=({1: seq},))
    return path


class Evil:
    """Unpickling this creates the marker (what ``torch.load(weights_only=False)`` would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- crafting ---------------------------------------------------------------------------------

def _rehash(art):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((art / name).read_bytes()).hexdigest()
                         for name in manifest["files"] if (art / name).is_file()}
    (art / "manifest.json").write_text(json.dumps(manifest))


def craft(base, tmp_path, graph=None, manifest=None):
    """A copy of ``base`` with its graph and/or manifest rewritten (hashes updated to match)."""
    art = tmp_path / "art"
    shutil.copytree(base, art)
    if graph is not None:
        data = json.loads((art / "graph.json").read_text())
        graph(data)
        (art / "graph.json").write_text(json.dumps(data))
    if manifest is not None:
        data = json.loads((art / "manifest.json").read_text())
        manifest(data)
        (art / "manifest.json").write_text(json.dumps(data))
    _rehash(art)
    return art


def _node(graph, name):
    return next(n for n in graph["nodes"] if n["name"] == name)


def add_calls(*calls):
    """Graph edit: insert call_function nodes ``(name, target, args, kwargs)`` before the output."""
    def edit(graph):
        out = next(i for i, n in enumerate(graph["nodes"]) if n["op"] == "output")
        for offset, (name, target, args, kwargs) in enumerate(calls):
            graph["nodes"].insert(out + offset, {"name": name, "op": "call_function", "meta": None,
                                                 "target": target, "args": {"tuple": args},
                                                 "kwargs": kwargs})
    return edit


def ref(name):
    return {"node": name}


def set_shape(node_name, axis, text):
    def edit(graph):
        _node(graph, node_name)["meta"]["tensor"]["shape"][axis] = text
    return edit


def _touch(marker):
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _plant_module(tmp_path, monkeypatch, marker):
    """A module on sys.path whose import creates the marker (a stand-in for any importable code)."""
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "fxf_planted_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "fxf_planted_payload", raising=False)
    return "fxf_planted_payload"


# --- the cases: (tmp_path, marker, monkeypatch) -> graph edit, manifest edit[, final edit] ------

CASES = {}


def case(make):
    CASES[make.__name__.lstrip("_")] = make
    return make


@case
def _exec_target(tmp, marker, mp):
    return add_calls(("evil", "builtins.exec", [f"open({str(marker)!r}, 'w').close()"], {})), None


@case
def _eval_target(tmp, marker, mp):
    return add_calls(("evil", "builtins.eval", [_touch(marker)], {})), None


@case
def _torch_load_pickle(tmp, marker, mp):
    payload = tmp / "payload.pt"
    payload.write_bytes(pickle.dumps(Evil(marker)))
    return add_calls(("evil", "torch.load", [str(payload)], {"weights_only": False})), None


@case
def _torch_save(tmp, marker, mp):
    return add_calls(("evil", "torch.save", [ref("x"), str(marker)], {})), None


@case
def _os_system(tmp, marker, mp):
    return add_calls(("evil", "os.system", [f"touch {marker}"], {})), None


@case
def _import_chain(tmp, marker, mp):
    return add_calls(("m", "builtins.__import__", ["pathlib"], {}),
                     ("cls", "builtins.getattr", [ref("m"), "Path"], {}),
                     ("p", "operator.call", [ref("cls"), str(marker)], {}),
                     ("touch", "builtins.getattr", [ref("p"), "touch"], {}),
                     ("evil", "operator.call", [ref("touch")], {})), None


@case
def _attrgetter_chain(tmp, marker, mp):
    """No builtins at all: a tensor's method globals hold ``torch``, hence ``torch.save``."""
    return add_calls(("g", "operator.attrgetter", ["__reduce_ex__.__globals__"], {}),
                     ("glob", "operator.call", [ref("g"), ref("x")], {}),
                     ("t", "operator.getitem", [ref("glob"), "torch"], {}),
                     ("s", "operator.methodcaller", ["save", "pwned", str(marker)], {}),
                     ("evil", "operator.call", [ref("s"), ref("t")], {})), None


@case
def _torch_ops_import_module(tmp, marker, mp):
    """``torch.ops.import_module`` reached through the three-part ``namespace.op.overload`` path."""
    module = _plant_module(tmp, mp, marker)
    return add_calls(("evil", "import_module.__call__.__call__", [module], {})), None


@case
def _aten_save_and_from_file(tmp, marker, mp):
    return add_calls(("evil", "aten.save.default", [ref("x"), str(marker)], {}),
                     ("leak", "aten.from_file.default", ["/etc/hostname"], {})), None


@case
def _aten_mutates_the_callers_input(tmp, marker, mp):
    return add_calls(("evil", "aten.fill_.Scalar", [ref("x"), 0.0], {})), None


@case
def _math_function(tmp, marker, mp):
    return add_calls(("evil", "math.factorial", [10 ** 6], {})), None


@case
def _sympify_meta_shape(tmp, marker, mp):
    return set_shape("x", 1, f"({_touch(marker)} or 0) + s27"), None


@case
def _lambda_meta_shape(tmp, marker, mp):
    return set_shape("view", 0, f"(lambda: {_touch(marker)})() or 2*s27"), None


@case
def _sympify_sym_meta(tmp, marker, mp):
    def edit(graph):
        _node(graph, "mul_6")["meta"]["sym"] = f"2*s27 + ({_touch(marker)} or 0)"
    return edit, None


@case
def _sympify_input_shape(tmp, marker, mp):
    def edit(manifest):
        manifest["inputs"][0]["shape"][1] = f"__import__('pathlib').Path({str(marker)!r}).touch() or seq"
    return None, edit


@case
def _huge_expression(tmp, marker, mp):
    return set_shape("x", 1, "+".join(["s27"] * 200_000)), None


@case
def _deep_expression(tmp, marker, mp):
    return set_shape("x", 1, "(" * 50_000 + "s27" + ")" * 50_000), None


@case
def _manifest_dtype_class(tmp, marker, mp):
    def edit(manifest):
        manifest["inputs"][0]["dtype"] = "__class__"
    return None, edit


@case
def _graph_dtype_class(tmp, marker, mp):
    def edit(graph):
        _node(graph, "x")["meta"]["tensor"]["dtype"] = "__class__"
    return edit, None


@case
def _placeholder_name_injection(tmp, marker, mp):
    """fx writes a placeholder's name into generated Python source: a default argument runs."""
    name = f"x=open({str(marker)!r}, 'w')"

    def edit(graph):
        text = json.dumps(graph).replace('"x"', json.dumps(name))
        graph.clear()
        graph.update(json.loads(text))
    return edit, None


@case
def _kwarg_name_injection(tmp, marker, mp):
    def edit(graph):
        _node(graph, "view")["kwargs"] = {f"out=open({str(marker)!r}, 'w'), memory_format": None}
    return edit, None


@case
def _get_attr_name_injection(tmp, marker, mp):
    """An alias (a name read from the manifest) that breaks out of fx's ``getattr(self, "...")``."""
    hostile = f'w"), open({str(marker)!r}, "w"), getattr(self, "p_lin_bias'

    def graph_edit(graph):
        _node(graph, "p_lin_bias")["target"] = hostile

    def manifest_edit(manifest):
        manifest["aliases"] = {hostile: "p_lin_bias"}
    return graph_edit, manifest_edit


@case
def _treespec_enum_import(tmp, marker, mp):
    """torch's pytree loader imports the module an ``__enum__`` context names."""
    module = _plant_module(tmp, mp, marker)
    enum = json.dumps({"__enum__": True, "fqn": f"{module}:E", "name": "X"})
    spec = [1, {"type": "builtins.dict", "context": f"[{enum}]",
                "children_spec": [{"type": None, "context": None, "children_spec": []}]}]

    def edit(manifest):
        manifest["out_spec"] = json.dumps(spec)
    return None, edit


@case
def _path_traversal(tmp, marker, mp):
    def edit(manifest):
        manifest["files"]["../../graph.json"] = manifest["files"].pop("graph.json")
    return None, edit


@case
def _kernel_sources(tmp, marker, mp):
    def edit(manifest):
        manifest["kernels"] = {"fused_0": f"import os\nos.system('touch {marker}')\n",
                               "fused_1.cpp": f'int x = system("touch {marker}");'}
    return None, edit


@case
def _negative_and_huge_sizes(tmp, marker, mp):
    def edit(graph):
        _node(graph, "permute")["meta"]["tensor"]["shape"] = ["-8", str(10 ** 30)]
    return edit, None


@case
def _bad_ranges(tmp, marker, mp):
    def edit(manifest):
        manifest["ranges"] = {"seq": ["__class__", -1]}
    return None, edit


@case
def _options_not_options(tmp, marker, mp):
    def edit(manifest):
        manifest["options"]["passes"] = ["no_such_pass"]
    return None, edit


@case
def _deeply_nested_json(tmp, marker, mp):
    def edit(graph):
        graph["nodes"][-2]["args"] = {"tuple": [0]}

    def finish(art):   # json.dumps itself cannot write this much nesting
        text = (art / "graph.json").read_text().replace('{"tuple": [0]}', "[" * 100_000 + "]" * 100_000)
        (art / "graph.json").write_text(text)
    return edit, None, finish


@case
def _device_string(tmp, marker, mp):
    def edit(graph):
        _node(graph, "x")["meta"]["tensor"]["device"] = f"cpu'); {_touch(marker)}; ('"
    return edit, None


@case
def _inputs_disagree_with_the_graph(tmp, marker, mp):
    """Inputs are checked against the manifest, kernels built from the graph: a native kernel
    built for float32 rows of 8 must not be handed int8 rows of 16."""
    def edit(manifest):
        manifest["inputs"][0].update(dtype="int8", shape=["2", "seq", "16"])
    return None, edit


@case
def _hostile_tuning_bundle(tmp, marker, mp):
    def finish(art):
        (art / "tuning.json").write_text(json.dumps(
            {"format": "fxforge-tuning", "schema": 1,
             "entries": [{"key": {"kernel": "x", "__import__": "os"}, "record": _touch(marker),
                          "checksum": "0"}]}))
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["files"]["tuning.json"] = ""
        (art / "manifest.json").write_text(json.dumps(manifest))
    return None, None, finish


def build(case, base, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    edits = CASES[case](tmp_path, marker, monkeypatch)
    graph_edit, manifest_edit = edits[:2]
    art = craft(base, tmp_path, graph_edit, manifest_edit)
    if len(edits) == 3:
        edits[2](art)
        _rehash(art)
    return art, marker


def test_there_are_enough_cases():
    assert len(CASES) >= 15, sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_artifact_is_refused_without_side_effects(case, base, tmp_path, monkeypatch):
    art, marker = build(case, base, tmp_path, monkeypatch)
    x = torch.randn(2, 5, 8)
    before = x.clone()
    with pytest.raises(fxforge.ArtifactError):
        loaded = fxforge.load(art)
        loaded(x)   # payloads that would only run on a call run here (if the load let them by)
    assert not marker.exists(), f"{case}: the payload ran"
    assert "fxf_planted_payload" not in sys.modules
    assert torch.equal(x, before)


CLI_CASES = ["exec_target", "torch_load_pickle", "sympify_meta_shape", "sympify_input_shape",
             "manifest_dtype_class", "placeholder_name_injection", "treespec_enum_import"]


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: artifact ") and "Traceback" not in stderr


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_info_refuses_a_hostile_artifact_in_one_line(case, base, tmp_path, monkeypatch, capsys):
    from fxforge.__main__ import main
    art, marker = build(case, base, tmp_path, monkeypatch)
    assert main(["info", str(art)]) == 2
    captured = capsys.readouterr()
    assert _one_error_line(captured.err), captured.err
    assert captured.out == "" and not marker.exists()


def test_cli_info_in_a_fresh_process_exits_2_without_a_traceback(base, tmp_path, monkeypatch):
    art, marker = build("torch_load_pickle", base, tmp_path, monkeypatch)
    result = subprocess.run([sys.executable, "-m", "fxforge", "info", str(art)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and _one_error_line(result.stderr), result.stderr
    assert not marker.exists()


def test_the_untouched_artifact_still_loads_and_runs(base):
    """The checks refuse what is hostile, not what fxforge itself writes."""
    loaded = fxforge.load(base)
    x = torch.randn(2, 7, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), Tiny().eval()(x), rtol=1e-4, atol=1e-4)
