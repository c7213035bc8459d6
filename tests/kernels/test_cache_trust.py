"""The kernel and tuning caches are trusted only when they are ours: folders created owner-only,
a folder or file that another user owns or can write is refused (warned once, not used), and a
cached library is loaded only if it still has the SHA-256 recorded when fxforge built it.

The planted library is real: compiled from C, with a constructor that creates a marker file and
the kernel's symbol as a no-op. If it were ever loaded the marker would exist and the results
would be garbage."""
from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.autotune.cache import CacheKey, TuningCache
from fxforge.irgraph import decomposition_table
from fxforge.kernels import cache_trust, fused_cpp
from fxforge.kernels.fused import build_program
from fxforge.testing import assert_close_to_eager

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOT_ROOT_REASON = "needs root to give a folder to another user (os.chown)"


def scaled_softmax(scale: float):
    gm = make_fx(lambda x: torch.softmax(x * scale, -1), decomposition_table=decomposition_table(),
                 tracing_mode="symbolic")(torch.randn(3, 8))
    return build_program(gm)


SCALES = (0.75, 1.25)
PROGRAMS = {scale: scaled_softmax(scale) for scale in SCALES}


def run_and_check(scale: float) -> None:
    kernel = fused_cpp.compile_program_cpu(PROGRAMS[scale])
    x = torch.randn(4, 9)
    assert_close_to_eager(kernel(x)[0], torch.softmax(x * scale, -1))


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> dict:
    """Both kernels built once into a cache of their own: {scale: library path}. Tests copy
    them (what fxforge built earlier) or take their predictable names (where to plant)."""
    folder = tmp_path_factory.mktemp("seed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXFORGE_CACHE_DIR", str(folder))
        return {scale: fused_cpp.build_shared_object(
            fused_cpp.generate_source(program, f"fused_{program.digest()}"))
            for scale, program in PROGRAMS.items()}


def copy_built(seed: dict, root, scale: float):
    """Put the library fxforge built (and its recorded digest) into ``root``'s kernel folder."""
    (root / "kernels").mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (seed[scale], sidecar(seed[scale])):
        shutil.copy2(path, root / "kernels" / path.name)
    return root / "kernels" / seed[scale].name


def digest_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sidecar(path):
    return path.with_name(path.name + ".sha256")


@pytest.fixture(autouse=True)
def _fresh_trust_state():
    """No warning given, fallback folder made or library loaded by an earlier test counts."""
    cache_trust.reset()
    yield
    cache_trust.reset()


@pytest.fixture
def root(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(bytes of a hostile library for SCALES[0]'s kernel, the marker its constructor creates)."""
    folder = tmp_path_factory.mktemp("planted")
    marker = folder / "PLANTED_CODE_RAN"
    symbol = f"fused_{PROGRAMS[SCALES[0]].digest()}"
    src = folder / "planted.cpp"
    src.write_text(f"""#include <stdio.h>
__attribute__((constructor)) static void plant(void) {{
  FILE* f = fopen("{marker}", "w"); if (f) fclose(f);
}}
extern "C" void {symbol}(void) {{}}   /* a no-op kernel: outputs stay uninitialised */
""")
    lib = folder / "planted.so"
    subprocess.run([fused_cpp.find_compiler(), "-shared", "-fPIC", str(src), "-o", str(lib)],
                   check=True, capture_output=True, timeout=120)
    probe = folder / "probe.so"   # the marker really appears when such a library is loaded
    shutil.copy(lib, probe)
    code = f"import ctypes; ctypes.CDLL({str(probe)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert marker.exists(), "the planted library's constructor did not run when loaded"
    marker.unlink()
    return lib.read_bytes(), marker


def plant(path, payload: bytes, *, forged_digest: bool = False, mode: int = 0o700) -> None:
    path.write_bytes(payload)
    path.chmod(mode)
    if forged_digest:   # an attacker who can write the folder can write the digest too
        sidecar(path).write_text(hashlib.sha256(payload).hexdigest() + "\n")


def trust_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("fxforge") and r.levelno >= logging.WARNING]


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- what fxforge creates ----------------------------------------------------------------------

def test_cache_folders_are_created_owner_only_and_libraries_get_a_digest(tmp_path, monkeypatch):
    root = tmp_path / "missing" / "parents" / "cache"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(root))
    run_and_check(SCALES[0])
    for folder in (tmp_path / "missing", tmp_path / "missing" / "parents", root, root / "kernels"):
        assert mode_of(folder) == 0o700, folder
    [library] = (root / "kernels").glob("*.so")
    assert mode_of(library) & 0o022 == 0
    assert sidecar(library).read_text().strip() == digest_of(library)
    assert mode_of(sidecar(library)) == 0o600
    path = TuningCache().put(CacheKey.make("probe", "h", {"M": 1}),
                             {"config": {"params": {"B": 1}, "num_warps": 1, "num_stages": 1}})
    assert mode_of(root / "autotune") == 0o700 and mode_of(path.parent) == 0o700


# --- planted libraries -------------------------------------------------------------------------

def test_library_planted_before_the_first_build_is_not_loaded(tmp_path, monkeypatch, planted,
                                                              seed, caplog):
    caplog.set_level(logging.INFO, logger="fxforge.cache")
    payload, marker = planted
    name = seed[SCALES[0]].name                        # the predictable file name
    victim = tmp_path / "victim"
    (victim / "kernels").mkdir(parents=True, mode=0o700)
    plant(victim / "kernels" / name, payload)          # no digest: fxforge never built it
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(victim))
    run_and_check(SCALES[0])
    assert not marker.exists()
    library = victim / "kernels" / name
    assert sidecar(library).read_text().strip() == digest_of(library) != hashlib.sha256(
        payload).hexdigest()
    assert any(str(library) in r.getMessage() and "no recorded digest" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("hostile", ["planted library", "garbage bytes"])
def test_library_replaced_after_its_build_is_rebuilt_with_a_warning(root, planted, seed, caplog,
                                                                   hostile):
    payload, marker = planted
    library = copy_built(seed, root, SCALES[0])
    plant(library, payload if hostile == "planted library" else b"\x7fELF garbage")
    run_and_check(SCALES[0])
    assert not marker.exists()
    assert sidecar(library).read_text().strip() == digest_of(library)
    messages = [m for m in trust_warnings(caplog) if str(library) in m]
    assert len(messages) == 1 and "digest" in messages[0]


@pytest.mark.parametrize("how", ["writable by others", "owned by another user",
                                 "a link to a file elsewhere"])
def test_library_with_a_forged_digest_but_bad_owner_mode_or_kind_is_not_loaded(
        root, planted, seed, caplog, tmp_path, how):
    if how == "owned by another user" and not IS_ROOT:
        pytest.skip(NOT_ROOT_REASON)
    payload, marker = planted
    (root / "kernels").mkdir(parents=True, mode=0o700)
    library = root / "kernels" / seed[SCALES[0]].name
    if how == "a link to a file elsewhere":
        elsewhere = tmp_path / "elsewhere.so"
        plant(elsewhere, payload)
        library.symlink_to(elsewhere)
        sidecar(library).write_text(hashlib.sha256(payload).hexdigest())
    else:
        mode = 0o666 if how == "writable by others" else 0o755
        plant(library, payload, forged_digest=True, mode=mode)
    if how == "owned by another user":
        os.chown(library, pwd.getpwnam("nobody").pw_uid, -1)
    run_and_check(SCALES[0])
    assert not marker.exists()
    assert not library.is_symlink() and library.stat().st_uid == os.geteuid()
    assert mode_of(library) & 0o022 == 0
    assert any(str(library) in m for m in trust_warnings(caplog))


def test_a_library_is_checked_once_per_process(root, seed, monkeypatch):
    for scale in SCALES:
        copy_built(seed, root, scale)
    run_and_check(SCALES[0])
    checked = []
    check = cache_trust._library_problem
    monkeypatch.setattr(cache_trust, "_library_problem",
                        lambda lib: checked.append(lib) or check(lib))
    run_and_check(SCALES[0])   # loaded already: its verified image is reused, nothing re-hashed
    run_and_check(SCALES[1])
    assert [p.name for p in checked] == [seed[SCALES[1]].name]


def test_every_library_is_opened_through_the_checked_loader():
    """A ``ctypes.CDLL`` anywhere else in kernels/ would skip the owner, mode and digest checks."""
    folder = Path(cache_trust.__file__).parent
    assert [p.name for p in folder.glob("*.py") if "CDLL(" in p.read_text()] == ["cache_trust.py"]


# --- folders that are not ours ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["cache root", "kernels folder"])
def test_world_writable_folder_is_warned_once_and_not_used(root, planted, seed, caplog, which):
    payload, marker = planted
    (root / "kernels").mkdir(parents=True, mode=0o700)
    plant(root / "kernels" / seed[SCALES[0]].name, payload, forged_digest=True)   # looks fine
    before = sorted(p.name for p in (root / "kernels").iterdir())
    refused = root if which == "cache root" else root / "kernels"
    refused.chmod(0o777)
    for _ in range(2):   # each compile looks at the folder again: one warning
        run_and_check(SCALES[0])
    assert not marker.exists()
    assert sorted(p.name for p in (root / "kernels").iterdir()) == before   # nothing new there
    messages = trust_warnings(caplog)
    assert len(messages) == 1 and str(refused) in messages[0] and "writable" in messages[0]


@pytest.mark.skipif(not IS_ROOT, reason=NOT_ROOT_REASON)
def test_cache_folder_owned_by_another_user_is_warned_once_and_not_used(root, caplog):
    root.mkdir(mode=0o755)
    os.chown(root, pwd.getpwnam("nobody").pw_uid, -1)
    for _ in range(2):
        run_and_check(SCALES[0])
    assert list(root.iterdir()) == []
    messages = trust_warnings(caplog)
    assert len(messages) == 1 and str(root) in messages[0] and "owned by" in messages[0]


@pytest.mark.parametrize("sticky", [False, True])
def test_a_parent_writable_by_others_is_refused_unless_sticky(tmp_path, monkeypatch, caplog,
                                                             sticky):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777 if sticky else 0o777)   # like /tmp, or a plain world-writable folder
    root = shared / "cache"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(root))
    run_and_check(SCALES[0])
    if sticky:   # others cannot rename or delete what we own there
        assert list((root / "kernels").glob("*.so")) and not trust_warnings(caplog)
    else:
        assert not root.exists()
        messages = trust_warnings(caplog)
        assert len(messages) == 1 and str(shared) in messages[0]


# --- the tuning cache ---------------------------------------------------------------------------

RECORD = {"config": {"params": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2}}


@pytest.mark.parametrize("how", ["folder writable by others", "entry writable by others",
                                 "entry owned by another user"])
def test_tuning_cache_ignores_entries_it_cannot_trust(root, caplog, how):
    if how == "entry owned by another user" and not IS_ROOT:
        pytest.skip(NOT_ROOT_REASON)
    key = CacheKey.make("probe", "h", {"M": 8})
    entry = TuningCache().put(key, RECORD)   # a valid entry (an attacker can compute checksums)
    assert TuningCache().get(key) == RECORD
    if how == "folder writable by others":
        root.chmod(0o777)
    elif how == "entry writable by others":
        entry.chmod(0o666)
    else:
        os.chown(entry, pwd.getpwnam("nobody").pw_uid, -1)
    for _ in range(2):
        assert TuningCache().get(key) is None
    assert len(trust_warnings(caplog)) == 1
    if how == "folder writable by others":   # nothing written where others can write
        assert TuningCache().put(CacheKey.make("probe", "h", {"M": 16}), RECORD) is None
        assert [p.name for p in entry.parent.iterdir()] == [entry.name]


# --- generated Triton source --------------------------------------------------------------------

def test_generated_triton_source_is_not_written_to_a_world_writable_folder(root, caplog,
                                                                           monkeypatch):
    pytest.importorskip("triton")
    from fxforge.kernels import fused_triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    gm = make_fx(lambda x: torch.softmax(x * 0.5, -1), decomposition_table=decomposition_table(),
                 tracing_mode="symbolic")(torch.randn(3, 8))
    module = f"fxforge_fused_fused_{build_program(gm).digest()}"
    monkeypatch.delitem(sys.modules, module, raising=False)
    kernel = fused_triton.compile_fused_triton(gm)
    x = torch.randn(2, 8)
    assert_close_to_eager(kernel(x)[0], torch.softmax(x * 0.5, -1))
    assert list(root.iterdir()) == []
    assert len(trust_warnings(caplog)) == 1
