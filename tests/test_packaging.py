"""Packaging: every subpackage is listed and mapped; bare folder names never import; the import
graph between the folders follows the layering table below (parsed, not searched for text)."""
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["irgraph", "passes", "backends", "kernels", "autotune", "examples"]

# Layers, by module-name prefix (the longest prefix wins). Leaves any layer may use: the error
# classes, the compile-time profile every stage records into, and the kernels' tuning contract
# and cache folder, which import no other kernel code.
# Any other module of fxforge/ is in the layer "fxforge"; fxforge/__init__.py itself is "package".
LAYER_OF = {
    "fxforge.errors": "errors", "fxforge.irgraph.compile_profile": "profile",
    "fxforge.irgraph": "irgraph", "fxforge.passes": "passes", "fxforge.backends": "backends",
    "fxforge.kernels": "kernels", "fxforge.autotune": "autotune", "fxforge.examples": "examples",
    "fxforge.kernels.tuning": "contract", "fxforge.kernels.cache_trust": "contract",
}
# Data flows capture -> IR -> passes -> backends -> kernels; a module imports only from the
# layers listed for its own (and its own layer). The autotuner sits beside the kernels: it reads
# their tuning contract (kernels/tuning.py) and cache folder; kernels consult it only through
# that contract (an open session installs itself there), never by importing autotune/.
ALL = {"package", "errors", "profile", "irgraph", "passes", "backends", "kernels", "contract", "autotune",
       "examples", "fxforge"}
ALLOWED = {
    "errors": set(),
    "profile": set(),
    "contract": {"errors"},
    "irgraph": {"errors", "profile"},
    "passes": {"errors", "profile", "irgraph"},
    "kernels": {"errors", "profile", "irgraph", "contract"},
    "autotune": {"errors", "profile", "contract"},
    "backends": {"errors", "profile", "irgraph", "kernels", "contract"},
    "fxforge": ALL,       # the public API, compile driver, AOT, CLI: on top of everything
    "examples": ALL,      # model sources and demos
    "package": {"errors", "fxforge"},
}
# Edges allowed only inside a function (run on use, not on import): importer -> imported layer.
LAZY_ONLY = {("autotune", "package"): "autotune/cache.py: fxforge.__version__ enters the cache key"}
# Module-level imports of fxforge/__init__.py: the leaves it may load eagerly (the rest is lazy).
PACKAGE_EAGER = {"fxforge.errors", "fxforge.options", "fxforge.backend_entry"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_folder_with_an_init_is_a_listed_package():
    setup = _pyproject()["tool"]["setuptools"]
    mapping, listed = setup["package-dir"], set(setup["packages"])
    found = set()
    for folder in FOLDERS + ["fxforge"]:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            prefix = "fxforge" if folder == "fxforge" else f"fxforge.{folder}"
            found.add(".".join((prefix,) + rel))
            assert (init.parent / "py.typed").exists() or rel, f"{folder} lacks py.typed"
    assert found == listed, f"pyproject packages differ: missing {found - listed}, extra {listed - found}"
    for folder in FOLDERS:
        assert mapping[f"fxforge.{folder}"] == folder


def test_bare_folder_names_are_not_importable_from_outside_the_repo(tmp_path):
    """A bare name may be another distribution's (transformers >= 5.25 installs ``kernels``),
    never one of this checkout's folders."""
    code = ("import importlib.util as u, json; import fxforge.passes, fxforge.irgraph;"
            "specs = {n: u.find_spec(n) for n in %r};"
            "print(json.dumps({n: s.origin or '' for n, s in specs.items() if s is not None}))"
            % (FOLDERS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    ours = {name: origin for name, origin in found.items()
            if origin and Path(origin).resolve().parent == (ROOT / name).resolve()}
    assert ours == {}


def test_entry_point_is_declared():
    eps = _pyproject()["project"]["entry-points"]["torch_dynamo_backends"]
    assert eps == {"fxforge": "fxforge.backend_entry:fxforge_backend"}


# ------------------------------------------------------------------------- the import graph
def _modules(root: Path, package_dirs: dict[str, str]) -> dict[str, Path]:
    """Module name -> file, for every .py under the mapped folders."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in (root / folder).rglob("*.py"):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package] + parts)] = path
    return modules


def _imports(path: Path, module: str, is_package: bool, known: set[str]):
    """(imported module, line, inside a function) for every fxforge import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    lazy_lines = {node.lineno for fn in ast.walk(tree)
                  if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                  for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the importer's package, level - 1 packages up
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in dict.fromkeys(names):   # once per imported module and line
            if name == "fxforge" or name.startswith("fxforge."):
                yield name, node.lineno, node.lineno in lazy_lines


def layer_of(module: str) -> str:
    if module == "fxforge":
        return "package"   # the version and the lazily loaded public names
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        if ".".join(parts[:end]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:end])]
    return "fxforge"


def import_edges(root: Path, package_dirs: dict[str, str]):
    """Every fxforge import of every module: (importer, imported, file, line, lazy)."""
    modules = _modules(root, package_dirs)
    for module, path in sorted(modules.items()):
        is_package = path.name == "__init__.py"
        for imported, line, lazy in _imports(path, module, is_package, set(modules)):
            yield module, imported, path.relative_to(root), line, lazy


def layering_violations(root: Path, package_dirs: dict[str, str]) -> list[str]:
    bad = []
    for importer, imported, path, line, lazy in import_edges(root, package_dirs):
        source, target = layer_of(importer), layer_of(imported)
        if source == target or target in ALLOWED[source]:
            continue
        if lazy and (source, target) in LAZY_ONLY:
            continue
        how = "in a function" if lazy else "at module level"
        bad.append(f"{path}:{line}: {source} imports {imported} ({target}) {how}")
    return bad


def _package_dirs(root: Path) -> dict[str, str]:
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def test_imports_between_folders_follow_the_layering_table():
    edges = list(import_edges(ROOT, _package_dirs(ROOT)))
    assert len(edges) > 300, f"only {len(edges)} fxforge imports found: the scan is broken"
    assert any(lazy for *_, lazy in edges), "function-level imports are part of the graph"
    assert layering_violations(ROOT, _package_dirs(ROOT)) == []


def test_the_lazy_only_edges_are_still_needed():
    """An exception that no import uses any more is removed from the table, not kept."""
    used = {(layer_of(a), layer_of(b)) for a, b, _, _, lazy in import_edges(ROOT, _package_dirs(ROOT))
            if lazy}
    assert set(LAZY_ONLY) <= used, set(LAZY_ONLY) - used


def test_the_package_init_loads_only_leaves_eagerly():
    init = ROOT / "fxforge" / "__init__.py"
    eager = {name for name, _, lazy in _imports(init, "fxforge", True, set()) if not lazy}
    assert eager <= PACKAGE_EAGER, eager - PACKAGE_EAGER
    for leaf in PACKAGE_EAGER:   # each leaf imports nothing but other leaves at module level
        path = ROOT / (leaf.replace(".", "/") + ".py")
        eager = {name for name, _, lazy in _imports(path, leaf, False, set()) if not lazy}
        assert eager <= PACKAGE_EAGER, (leaf, eager - PACKAGE_EAGER)


def _plant(root: Path, files: dict[str, str]) -> None:
    (root / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"fxforge" = "fxforge"\n'
        + "".join(f'"fxforge.{f}" = "{f}"\n' for f in FOLDERS))
    for folder in FOLDERS + ["fxforge"]:
        (root / folder).mkdir()
        (root / folder / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)


def test_the_check_finds_planted_bad_edges(tmp_path):
    _plant(tmp_path, {
        "irgraph/graph.py": "from fxforge.passes import base\n",                  # IR -> passes
        "kernels/gemm.py": "def f():\n    from fxforge.backends.cpu import x\n",  # lazy, still bad
        "kernels/tune.py": "import fxforge.autotune.session\n",                  # kernels -> autotune
        "autotune/cache.py": "from ..kernels import gemm\nfrom fxforge.kernels.tuning import C\n",
        "passes/base.py": "from fxforge.irgraph import graph\nfrom fxforge.errors import E\n",
        "fxforge/errors.py": "", "kernels/tuning.py": "from fxforge.errors import E\n",
    })
    found = layering_violations(tmp_path, _package_dirs(tmp_path))
    assert found == [
        "autotune/cache.py:1: autotune imports fxforge.kernels.gemm (kernels) at module level",
        "irgraph/graph.py:1: irgraph imports fxforge.passes.base (passes) at module level",
        "kernels/gemm.py:2: kernels imports fxforge.backends.cpu (backends) in a function",
        "kernels/tune.py:1: kernels imports fxforge.autotune.session (autotune) at module level",
    ], found


# --------------------------------------------------------------- what an import really runs
PROBES = ["fxforge.irgraph.graph", "fxforge.irgraph.pattern", "fxforge.backends.base",
          "fxforge.kernels.gemm_cpu", "fxforge.kernels.fused_cpp", "fxforge.autotune.session"]
COMPILER = ("fxforge.api", "fxforge.compiler", "fxforge.aot")


def _first_import_of_the_compiler(modules: list[str], tmp_path) -> str:
    """Imports ``modules`` in order in a fresh interpreter; the first that loaded the compile
    driver, as "module -> what it loaded", or "" if none did."""
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            f"    hit = [c for c in {COMPILER!r} if c in sys.modules]\n"
            "    if hit:\n"
            "        print(m, '->', hit); break\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_importing_a_module_of_any_folder_does_not_run_the_public_api(tmp_path):
    assert _first_import_of_the_compiler(PROBES, tmp_path) == ""
    # the probe does see the compiler where a module loads it
    assert _first_import_of_the_compiler(["fxforge.kernels.tuning", "fxforge.aot"], tmp_path) \
        .startswith("fxforge.aot -> ")


def test_public_names_resolve_lazily_and_are_never_shadowed_by_submodules(tmp_path):
    code = ("import types, fxforge.explain, fxforge.generate, fxforge\n"
            "names = ['explain', 'generate', 'compile', 'aot_compile', 'load', 'Session']\n"
            "print([n for n in names if isinstance(getattr(fxforge, n), types.ModuleType)])\n"
            "from fxforge import explain\n"
            "print(explain.__module__, sorted(set(fxforge.__all__) - set(dir(fxforge))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "fxforge.explain []"]
