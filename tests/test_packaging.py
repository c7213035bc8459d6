"""Packaging: every subpackage is listed and mapped; bare folder names never import."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["irgraph", "passes", "backends", "kernels", "autotune", "examples"]


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
    code = ("import importlib.util as u; import fxforge.passes, fxforge.irgraph;"
            "print([n for n in %r if u.find_spec(n) is not None])" % (FOLDERS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_entry_point_is_declared():
    eps = _pyproject()["project"]["entry-points"]["torch_dynamo_backends"]
    assert eps == {"fxforge": "fxforge.backend_entry:fxforge_backend"}


def test_layering_passes_never_import_backends_and_kernels_never_import_passes():
    for folder, banned in (("passes", ("fxforge.backends", "fxforge.kernels")),
                           ("irgraph", ("fxforge.passes", "fxforge.backends", "fxforge.kernels")),
                           ("kernels", ("fxforge.passes",)),
                           ("autotune", ("fxforge.passes",))):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            for name in banned:
                assert f"import {name}" not in text and f"from {name}" not in text, (source, name)
