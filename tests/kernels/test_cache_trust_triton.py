"""Generated Triton source runs from memory, exactly as generated: never through the import
system's bytecode cache, whose ``__pycache__`` would be made with the umask's mode and whose
``.pyc`` runs instead of the source whenever its header matches the source's mtime and size.
The source is kept in a cache folder only if that folder is ours (``kernels/cache_trust.py``)."""
from __future__ import annotations

import importlib.util
import inspect
import marshal
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.irgraph import decomposition_table
from fxforge.kernels.fused import build_program
from fxforge.kernels.toolchain import source_hash
from fxforge.testing import assert_close_to_eager


pytestmark = pytest.mark.usefixtures("fresh_trust_state")




def triton_group(scale: float):
    return make_fx(lambda x: torch.softmax(x * scale, -1), decomposition_table=decomposition_table(),
                   tracing_mode="symbolic")(torch.randn(3, 8))


@pytest.fixture
def triton(monkeypatch):
    """fused_triton in interpreter mode, with bytecode writing on (as for a user: the test
    environment may set PYTHONDONTWRITEBYTECODE, which would hide a .pyc written or read).
    The mode must be on before ``triton.language`` is imported (its own helpers are jitted
    then), so it is read from the environment ``make test`` sets, not set here."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on the CPU only with TRITON_INTERPRET=1")
    from fxforge.kernels import fused_triton
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    return fused_triton


def fresh_triton_kernel(triton, scale: float, monkeypatch):
    """(graph, its generated source, where fxforge keeps that source), not yet imported here."""
    gm = triton_group(scale)
    program = build_program(gm)
    name = f"fused_{program.digest()}"
    monkeypatch.delitem(sys.modules, f"fxforge_fused_{name}", raising=False)
    source = triton.generate_source(program, name)
    return gm, source, f"{name}_{source_hash(source)[:16]}.py"


def check_softmax(kernel, scale: float) -> None:
    x = torch.randn(2, 8)
    assert_close_to_eager(kernel(x)[0], torch.softmax(x * scale, -1))


def test_generated_triton_source_is_not_written_to_a_world_writable_folder(root, trust_warnings, triton,
                                                                           monkeypatch):
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    gm, _, _ = fresh_triton_kernel(triton, 0.5, monkeypatch)
    check_softmax(triton.compile_fused_triton(gm), 0.5)
    assert list(root.iterdir()) == []
    assert len(trust_warnings()) == 1


def test_generated_triton_source_runs_from_memory_without_bytecode(root, triton, monkeypatch):
    """No __pycache__ beside the source (it would be made with the umask's mode, unchecked), and
    Triton still reads the kernel's source (inspect) to compile it."""
    gm, source, file_name = fresh_triton_kernel(triton, 0.625, monkeypatch)
    kernel = triton.compile_fused_triton(gm)
    check_softmax(kernel, 0.625)
    folder = root / "kernels" / "triton"
    assert [p.name for p in folder.iterdir()] == [file_name]
    assert (folder / file_name).read_text() == source   # a copy for people; never read back
    assert inspect.getsource(kernel.kernel.fn) in source


def test_a_planted_bytecode_file_for_generated_triton_source_is_never_run(root, triton,
                                                                          monkeypatch, tmp_path):
    """A group-writable __pycache__ (what umask 002 makes) holds a .pyc whose header matches the
    genuine source's mtime and size: the import system would run it instead of the source."""
    gm, source, file_name = fresh_triton_kernel(triton, 0.375, monkeypatch)
    folder = root / "kernels" / "triton"
    folder.mkdir(parents=True, mode=0o700)
    genuine = folder / file_name
    genuine.write_text(source)                              # as an earlier run left it
    genuine.chmod(0o600)
    marker = tmp_path / "PLANTED_BYTECODE_RAN"
    hostile = compile(source + f"\nopen({str(marker)!r}, 'w').close()\n", str(genuine), "exec")
    pyc = Path(importlib.util.cache_from_source(str(genuine)))
    pyc.parent.mkdir(mode=0o777)
    pyc.parent.chmod(0o777)
    st = genuine.stat()
    header = importlib.util.MAGIC_NUMBER + b"\0\0\0\0" + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(
        4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    pyc.write_bytes(header + marshal.dumps(hostile))
    check_softmax(triton.compile_fused_triton(gm), 0.375)
    assert not marker.exists()
