"""The kernel and tuning caches are trusted only when they are ours: folders created owner-only,
a folder or file that another user owns or can write is refused (warned once, not used), and a
cached library is loaded only if it still has the SHA-256 recorded when fxforge built it.

The planted library is real: compiled from C, with a constructor that creates a marker file and
the kernel's symbol as a no-op. If it were ever loaded the marker would exist and the results
would be garbage."""
from __future__ import annotations

import hashlib
import json
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
from fxforge.kernels import cache_trust, fused_cpp, toolchain
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
    """Both kernels built once into a cache of their own: {scale: the cache's name for the
    library, whose record ``<name>.sha256`` names the library file}. Tests copy what fxforge
    built earlier, or take the predictable names (where to plant)."""
    folder = tmp_path_factory.mktemp("seed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXFORGE_CACHE_DIR", str(folder))
        return {scale: toolchain.build_shared_object(
            fused_cpp.generate_source(program, f"fused_{program.digest()}"))
            for scale, program in PROGRAMS.items()}


def record_of(target):
    return target.with_name(target.name + ".sha256")


def recorded_library(target):
    """The library file that ``target``'s record names."""
    return cache_trust.library_path(target, record_of(target).read_text().strip())


def copy_built(seed: dict, root, scale: float):
    """Put the library fxforge built and its record into ``root``'s kernel folder; returns the
    copied library."""
    (root / "kernels").mkdir(parents=True, exist_ok=True, mode=0o700)
    built = recorded_library(seed[scale])
    for path in (built, record_of(seed[scale])):
        shutil.copy2(path, root / "kernels" / path.name)
    return root / "kernels" / built.name


def digest_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


pytestmark = pytest.mark.usefixtures("fresh_trust_state")



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
    subprocess.run([toolchain.find_compiler(), "-shared", "-fPIC", str(src), "-o", str(lib)],
                   check=True, capture_output=True, timeout=120)
    probe = folder / "probe.so"   # the marker really appears when such a library is loaded
    shutil.copy(lib, probe)
    code = f"import ctypes; ctypes.CDLL({str(probe)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert marker.exists(), "the planted library's constructor did not run when loaded"
    marker.unlink()
    return lib.read_bytes(), marker


def plant(path, payload: bytes, mode: int = 0o700) -> None:
    path.write_bytes(payload)
    path.chmod(mode)


def plant_recorded(target, payload: bytes, mode: int = 0o700):
    """What an attacker who can write the folder plants: a library under its digest's name and
    a record naming it. Returns the planted library."""
    digest = hashlib.sha256(payload).hexdigest()
    library = cache_trust.library_path(target, digest)
    plant(library, payload, mode)
    record_of(target).write_text(digest + "\n")
    return library



def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- what fxforge creates ----------------------------------------------------------------------

def test_cache_folders_are_created_owner_only_and_libraries_get_a_digest(tmp_path, monkeypatch):
    root = tmp_path / "missing" / "parents" / "cache"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(root))
    run_and_check(SCALES[0])
    for folder in (tmp_path / "missing", tmp_path / "missing" / "parents", root, root / "kernels"):
        assert mode_of(folder) == 0o700, folder
    [record] = (root / "kernels").glob("*.sha256")
    [library] = (root / "kernels").glob("*.so")
    assert library == recorded_library(record.with_name(record.name.removesuffix(".sha256")))
    assert mode_of(library) & 0o022 == 0
    assert record.read_text().strip() == digest_of(library)
    assert mode_of(record) == 0o600
    path = TuningCache().put(CacheKey.make("probe", "h", {"M": 1}),
                             {"config": {"params": {"B": 1}, "num_warps": 1, "num_stages": 1}})
    assert mode_of(root / "autotune") == 0o700 and mode_of(path.parent) == 0o700
    assert mode_of(path) == 0o600


# --- planted libraries -------------------------------------------------------------------------

def test_library_planted_before_the_first_build_is_not_loaded(tmp_path, monkeypatch, planted,
                                                              seed):
    payload, marker = planted
    target = seed[SCALES[0]]
    victim = tmp_path / "victim"
    (victim / "kernels").mkdir(parents=True, mode=0o700)
    for name in (target.name, recorded_library(target).name):   # the predictable file names
        plant(victim / "kernels" / name, payload)               # no record: fxforge never built it
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(victim))
    run_and_check(SCALES[0])
    assert not marker.exists()
    target = victim / "kernels" / target.name
    assert record_of(target).read_text().strip() == digest_of(recorded_library(target)) \
        != hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("hostile", ["planted library", "garbage bytes"])
def test_library_replaced_after_its_build_is_rebuilt_with_a_warning(root, planted, seed, trust_warnings,
                                                                   hostile):
    payload, marker = planted
    library = copy_built(seed, root, SCALES[0])
    plant(library, payload if hostile == "planted library" else b"\x7fELF garbage")
    run_and_check(SCALES[0])
    assert not marker.exists()
    rebuilt = recorded_library(root / "kernels" / seed[SCALES[0]].name)
    assert record_of(root / "kernels" / seed[SCALES[0]].name).read_text().strip() == \
        digest_of(rebuilt)
    messages = [m for m in trust_warnings() if str(library) in m]
    assert len(messages) == 1 and "digest" in messages[0]


@pytest.mark.parametrize("how", ["writable by others", "owned by another user",
                                 "a link to a file elsewhere"])
def test_library_with_a_forged_digest_but_bad_owner_mode_or_kind_is_not_loaded(
        root, planted, seed, trust_warnings, tmp_path, how):
    if how == "owned by another user" and not IS_ROOT:
        pytest.skip(NOT_ROOT_REASON)
    payload, marker = planted
    (root / "kernels").mkdir(parents=True, mode=0o700)
    target = root / "kernels" / seed[SCALES[0]].name
    library = plant_recorded(target, payload, mode=0o666 if how == "writable by others" else 0o755)
    if how == "a link to a file elsewhere":
        elsewhere = tmp_path / "elsewhere.so"
        library.rename(elsewhere)
        library.symlink_to(elsewhere)
    if how == "owned by another user":
        os.chown(library, pwd.getpwnam("nobody").pw_uid, -1)
    run_and_check(SCALES[0])
    assert not marker.exists()
    rebuilt = recorded_library(target)
    assert rebuilt != library and not rebuilt.is_symlink() and rebuilt.stat().st_uid == os.geteuid()
    assert mode_of(rebuilt) & 0o022 == 0
    assert any(str(library) in m for m in trust_warnings())


def test_a_library_is_checked_once_per_process(root, seed, monkeypatch):
    for scale in SCALES:
        copy_built(seed, root, scale)
    run_and_check(SCALES[0])
    checked = []
    check = cache_trust._library_problem
    monkeypatch.setattr(cache_trust, "_library_problem",
                        lambda lib, digest: checked.append(lib) or check(lib, digest))
    run_and_check(SCALES[0])   # loaded already: its verified image is reused, nothing re-hashed
    run_and_check(SCALES[1])
    assert [p.name for p in checked] == [recorded_library(seed[SCALES[1]]).name]


# Another process loading a kernel: cache_trust loaded from its file (stdlib-only imports).
LOADER = r"""
import importlib.util, json, logging, sys
from pathlib import Path
module_path, target = sys.argv[1:3]
spec = importlib.util.spec_from_file_location("fxforge.kernels.cache_trust", module_path)
trust = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = trust
spec.loader.exec_module(trust)
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("fxforge.cache").addHandler(handler)
try:
    loaded = trust.load_library(Path(target)).fxf_version()
except OSError:
    loaded = None
print(json.dumps({"loaded": loaded, "messages": messages}))
"""


def load_in_another_process(target) -> dict:
    done = subprocess.run([sys.executable, "-c", LOADER, cache_trust.__file__, str(target)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_library_reinstalled_while_another_process_loads_it_gives_no_false_alarm(
        root, tmp_path, monkeypatch):
    """At every step of installing a new build (each rename into the kernel folder), a process
    that loads the kernel finds a library and a digest that agree: the old pair or the new."""
    folder = root / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    target = folder / "probe_0123.so"
    builds = []
    for version in (1, 2):
        src = tmp_path / f"v{version}.c"
        src.write_text(f"int fxf_version(void) {{ return {version}; }}\n")
        builds.append(tmp_path / f"v{version}.so")
        subprocess.run([toolchain.find_compiler(), "-shared", "-fPIC", "-x", "c", str(src), "-o",
                        str(builds[-1])], check=True, capture_output=True, timeout=120)
    cache_trust.install_library(builds[0], target)
    seen = []
    rename = os.replace

    def rename_then_load(src, dst):
        rename(src, dst)
        if Path(dst).parent == folder:
            seen.append(load_in_another_process(target))

    monkeypatch.setattr(os, "replace", rename_then_load)
    cache_trust.install_library(builds[1], target)
    monkeypatch.setattr(os, "replace", rename)
    assert seen and all(r["messages"] == [] and r["loaded"] in (1, 2) for r in seen), seen
    assert seen[-1]["loaded"] == 2


def test_every_library_is_opened_through_the_checked_loader():
    """A ``ctypes.CDLL`` anywhere else in kernels/ would skip the owner, mode and digest checks."""
    folder = Path(cache_trust.__file__).parent
    assert [p.name for p in folder.glob("*.py") if "CDLL(" in p.read_text()] == ["cache_trust.py"]


# --- folders that are not ours ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["cache root", "kernels folder"])
def test_world_writable_folder_is_warned_once_and_not_used(root, planted, seed, trust_warnings, which):
    payload, marker = planted
    (root / "kernels").mkdir(parents=True, mode=0o700)
    plant_recorded(root / "kernels" / seed[SCALES[0]].name, payload)   # looks fine
    before = sorted(p.name for p in (root / "kernels").iterdir())
    refused = root if which == "cache root" else root / "kernels"
    refused.chmod(0o777)
    for _ in range(2):   # each compile looks at the folder again: one warning
        run_and_check(SCALES[0])
    assert not marker.exists()
    assert sorted(p.name for p in (root / "kernels").iterdir()) == before   # nothing new there
    messages = trust_warnings()
    assert len(messages) == 1 and str(refused) in messages[0] and "writable" in messages[0]


@pytest.mark.skipif(not IS_ROOT, reason=NOT_ROOT_REASON)
def test_cache_folder_owned_by_another_user_is_warned_once_and_not_used(root, trust_warnings):
    root.mkdir(mode=0o755)
    os.chown(root, pwd.getpwnam("nobody").pw_uid, -1)
    for _ in range(2):
        run_and_check(SCALES[0])
    assert list(root.iterdir()) == []
    messages = trust_warnings()
    assert len(messages) == 1 and str(root) in messages[0] and "owned by" in messages[0]


@pytest.mark.parametrize("sticky", [False, True])
def test_a_parent_writable_by_others_is_refused_unless_sticky(tmp_path, monkeypatch, trust_warnings,
                                                             sticky):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777 if sticky else 0o777)   # like /tmp, or a plain world-writable folder
    root = shared / "cache"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(root))
    run_and_check(SCALES[0])
    if sticky:   # others cannot rename or delete what we own there
        assert list((root / "kernels").glob("*.so")) and not trust_warnings()
    else:
        assert not root.exists()
        messages = trust_warnings()
        assert len(messages) == 1 and str(shared) in messages[0]


# --- the tuning cache ---------------------------------------------------------------------------

RECORD = {"config": {"params": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2}}


@pytest.mark.parametrize("how", ["folder writable by others", "entry writable by others",
                                 "entry owned by another user"])
def test_tuning_cache_ignores_entries_it_cannot_trust(root, trust_warnings, how):
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
    assert len(trust_warnings()) == 1
    if how == "folder writable by others":   # nothing written where others can write
        assert TuningCache().put(CacheKey.make("probe", "h", {"M": 16}), RECORD) is None
        assert [p.name for p in entry.parent.iterdir()] == [entry.name]
