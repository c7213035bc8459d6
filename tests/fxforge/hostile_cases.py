"""The hostile artifacts: each case names what an attacker rewrites (``hostile_crafting.Hostile``).

A case is ``(tmp_path, marker, monkeypatch) -> Hostile``; every payload would create ``marker``
(or import a planted module that does), change process state (the global RNG, grad mode) or
read a file, if anything ran it.
"""
import json
import pickle

from tests.fxforge.hostile_crafting import (Evil, Hostile, add_calls, node, plant_module, ref,
                                            rename, set_shape, touch_code)

CASES = {}


def case(make):
    CASES[make.__name__.lstrip("_")] = make
    return make


# --- targets: only ops that compute, never Python that runs --------------------------------

@case
def _exec_target(tmp, marker, mp):
    return Hostile(add_calls(("evil", "builtins.exec", [f"open({str(marker)!r}, 'w').close()"],
                              {})))


@case
def _eval_target(tmp, marker, mp):
    return Hostile(add_calls(("evil", "builtins.eval", [touch_code(marker)], {})))


@case
def _torch_load_pickle(tmp, marker, mp):
    payload = tmp / "payload.pt"
    payload.write_bytes(pickle.dumps(Evil(marker)))
    return Hostile(add_calls(("evil", "torch.load", [str(payload)], {"weights_only": False})))


@case
def _torch_save(tmp, marker, mp):
    return Hostile(add_calls(("evil", "torch.save", [ref("x"), str(marker)], {})))


@case
def _os_system(tmp, marker, mp):
    return Hostile(add_calls(("evil", "os.system", [f"touch {marker}"], {})))


@case
def _import_chain(tmp, marker, mp):
    return Hostile(add_calls(("m", "builtins.__import__", ["pathlib"], {}),
                             ("cls", "builtins.getattr", [ref("m"), "Path"], {}),
                             ("p", "operator.call", [ref("cls"), str(marker)], {}),
                             ("touch", "builtins.getattr", [ref("p"), "touch"], {}),
                             ("evil", "operator.call", [ref("touch")], {})))


@case
def _attrgetter_chain(tmp, marker, mp):
    """No builtins at all: a tensor's method globals hold ``torch``, hence ``torch.save``."""
    return Hostile(add_calls(("g", "operator.attrgetter", ["__reduce_ex__.__globals__"], {}),
                             ("glob", "operator.call", [ref("g"), ref("x")], {}),
                             ("t", "operator.getitem", [ref("glob"), "torch"], {}),
                             ("s", "operator.methodcaller", ["save", "pwned", str(marker)], {}),
                             ("evil", "operator.call", [ref("s"), ref("t")], {})))


@case
def _torch_ops_import_module(tmp, marker, mp):
    """``torch.ops.import_module`` reached through the three-part ``namespace.op.overload`` path."""
    module = plant_module(tmp, mp, marker)
    return Hostile(add_calls(("evil", "import_module.__call__.__call__", [module], {})))


@case
def _aten_save_and_from_file(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten.save.default", [ref("x"), str(marker)], {}),
                             ("leak", "aten.from_file.default", ["/etc/hostname"], {})))


@case
def _aten_mutates_the_callers_input(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten.fill_.Scalar", [ref("x"), 0.0], {})))


@case
def _aten_reseeds_the_global_rng(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten.manual_seed.default", [0], {})))


@case
def _aten_turns_grad_mode_off(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten.set_grad_enabled.default", [False], {})))


@case
def _aten_runs_autograd(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten._backward.default", [ref("x"), {"list": []}], {}),
                             ("dist", "aten.dist_backward.default", [0, {"list": []}], {})))


@case
def _aten_resizes_the_cufft_plan_cache(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten._cufft_set_plan_cache_max_size.default", [0, 0], {}),
                             ("clear", "aten._cufft_clear_plan_cache.default", [0], {})))


@case
def _torchscript_list_repeat(tmp, marker, mp):
    """A TorchScript builtin reached through ``torch.ops.aten``: a list of 2**40 items."""
    return Hostile(add_calls(("evil", "aten.mul.left_t", [{"list": [0]}, 2 ** 40], {})))


@case
def _math_function(tmp, marker, mp):
    return Hostile(add_calls(("evil", "math.factorial", [10 ** 6], {})))


@case
def _integer_beyond_int64(tmp, marker, mp):
    return Hostile(add_calls(("evil", "aten.add.Scalar", [ref("x"), 2 ** 63], {})))


# --- sizes, dtypes and devices: parsed, never evaluated ------------------------------------

@case
def _sympify_meta_shape(tmp, marker, mp):
    return Hostile(set_shape("x", 1, f"({touch_code(marker)} or 0) + s27"))


@case
def _lambda_meta_shape(tmp, marker, mp):
    return Hostile(set_shape("view", 0, f"(lambda: {touch_code(marker)})() or 2*s27"))


@case
def _sympify_sym_meta(tmp, marker, mp):
    def edit(graph):
        node(graph, "mul_6")["meta"]["sym"] = f"2*s27 + ({touch_code(marker)} or 0)"
    return Hostile(edit)


@case
def _sympify_input_shape(tmp, marker, mp):
    def edit(manifest):
        manifest["inputs"][0]["shape"][1] = f"{touch_code(marker)} or seq"
    return Hostile(manifest=edit)


@case
def _huge_expression(tmp, marker, mp):
    return Hostile(set_shape("x", 1, "+".join(["s27"] * 200_000)))


@case
def _deep_expression(tmp, marker, mp):
    return Hostile(set_shape("x", 1, "(" * 50_000 + "s27" + ")" * 50_000))


@case
def _negative_and_huge_sizes(tmp, marker, mp):
    def edit(graph):
        node(graph, "permute")["meta"]["tensor"]["shape"] = ["-8", str(10 ** 30)]
    return Hostile(edit)


@case
def _manifest_dtype_class(tmp, marker, mp):
    def edit(manifest):
        manifest["inputs"][0]["dtype"] = "__class__"
    return Hostile(manifest=edit)


@case
def _graph_dtype_class(tmp, marker, mp):
    def edit(graph):
        node(graph, "x")["meta"]["tensor"]["dtype"] = "__class__"
    return Hostile(edit)


@case
def _device_string(tmp, marker, mp):
    def edit(graph):
        node(graph, "x")["meta"]["tensor"]["device"] = f"cpu'); {touch_code(marker)}; ('"
    return Hostile(edit)


# --- names: fx writes them into the Python source it generates ----------------------------

@case
def _placeholder_name_injection(tmp, marker, mp):
    """A placeholder's name is an argument of the generated ``forward``: a default value runs."""
    return Hostile(rename("x", f"x=open({str(marker)!r}, 'w')"))


@case
def _input_named_torch(tmp, marker, mp):
    """An argument called ``torch`` hides the module the generated code calls ops through."""
    return Hostile(rename("x", "torch"), rename("x", "torch"))


@case
def _input_named_self(tmp, marker, mp):
    return Hostile(rename("x", "self"), rename("x", "self"))


@case
def _constants_named_after_module_attributes(tmp, marker, mp):
    """A constant becomes an attribute of the graph's module: ``graph`` or ``forward`` would
    replace the module's own."""
    def graph_edit(graph):
        node(graph, "p_lin_bias")["target"] = "graph"
        node(graph, "p_norm_bias")["target"] = "forward"

    def manifest_edit(manifest):
        manifest["aliases"] = {"graph": "p_lin_bias", "forward": "p_norm_bias"}
    return Hostile(graph_edit, manifest_edit)


@case
def _kwarg_name_injection(tmp, marker, mp):
    def edit(graph):
        node(graph, "view")["kwargs"] = {f"out=open({str(marker)!r}, 'w'), memory_format": None}
    return Hostile(edit)


@case
def _get_attr_name_injection(tmp, marker, mp):
    """An alias (a name read from the manifest) that breaks out of fx's ``getattr(self, "...")``."""
    hostile = f'w"), open({str(marker)!r}, "w"), getattr(self, "p_lin_bias'

    def graph_edit(graph):
        node(graph, "p_lin_bias")["target"] = hostile

    def manifest_edit(manifest):
        manifest["aliases"] = {hostile: "p_lin_bias"}
    return Hostile(graph_edit, manifest_edit)


# --- the manifest's other fields -----------------------------------------------------------

@case
def _treespec_enum_import(tmp, marker, mp):
    """torch's pytree loader imports the module an ``__enum__`` context names."""
    module = plant_module(tmp, mp, marker)
    enum = json.dumps({"__enum__": True, "fqn": f"{module}:E", "name": "X"})
    spec = [1, {"type": "builtins.dict", "context": f"[{enum}]",
                "children_spec": [{"type": None, "context": None, "children_spec": []}]}]

    def edit(manifest):
        manifest["out_spec"] = json.dumps(spec)
    return Hostile(manifest=edit)


@case
def _path_traversal(tmp, marker, mp):
    def edit(manifest):
        manifest["files"]["../../graph.json"] = manifest["files"].pop("graph.json")
    return Hostile(manifest=edit)


@case
def _kernel_sources(tmp, marker, mp):
    def edit(manifest):
        manifest["kernels"] = {"fused_0": f"import os\nos.system('touch {marker}')\n",
                               "fused_1.cpp": f'int x = system("touch {marker}");'}
    return Hostile(manifest=edit)


@case
def _bad_ranges(tmp, marker, mp):
    def edit(manifest):
        manifest["ranges"] = {"seq": ["__class__", -1]}
    return Hostile(manifest=edit)


@case
def _range_of_a_number(tmp, marker, mp):
    """Ranges are kept per dynamic size, by name: ``2`` is not one."""
    def edit(manifest):
        manifest["ranges"]["2"] = [0, 4]
    return Hostile(manifest=edit)


@case
def _options_not_options(tmp, marker, mp):
    def edit(manifest):
        manifest["options"]["passes"] = ["no_such_pass"]
    return Hostile(manifest=edit)


@case
def _deeply_nested_json(tmp, marker, mp):
    def edit(graph):
        graph["nodes"][-2]["args"] = {"tuple": [0]}

    def finish(art):   # json.dumps itself cannot write this much nesting
        text = (art / "graph.json").read_text().replace('{"tuple": [0]}',
                                                         "[" * 100_000 + "]" * 100_000)
        (art / "graph.json").write_text(text)
    return Hostile(edit, finish=finish)


@case
def _inputs_disagree_with_the_graph(tmp, marker, mp):
    """Inputs are checked against the manifest, kernels built from the graph: a native kernel
    built for float32 rows of 8 must not be handed int8 rows of 16."""
    def edit(manifest):
        manifest["inputs"][0].update(dtype="int8", shape=["2", "seq", "16"])
    return Hostile(manifest=edit)


@case
def _hostile_tuning_bundle(tmp, marker, mp):
    def finish(art):
        (art / "tuning.json").write_text(json.dumps(
            {"format": "fxforge-tuning", "schema": 1,
             "entries": [{"key": {"kernel": "x", "__import__": "os"},
                          "record": touch_code(marker), "checksum": "0"}]}))
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["files"]["tuning.json"] = ""
        (art / "manifest.json").write_text(json.dumps(manifest))
    return Hostile(finish=finish)


@case
def _kv_cache_inputs_reordered(tmp, marker, mp):
    """The runtime passes the position and the caches to the step graph by position, in the
    manifest's order: the same names in another order would hand one layer another's cache."""
    def edit(manifest):
        manifest["kv_cache"]["caches"].reverse()
    return Hostile(manifest=edit, base="kv_gpt")
