"""The tuning cache across processes: concurrent writers and readers never see a partial entry.
The worker processes load the cache's modules from their files, which holds only while those
modules import nothing but the standard library and each other: checked here too."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

from fxforge.autotune import cache as cache_mod
from fxforge.autotune import cache_format
from fxforge.autotune.cache import CacheKey, TuningCache
from fxforge.kernels import cache_trust

# Workers load the tuning cache's modules straight from their files, each under its own name and
# in import order (their imports are stdlib only besides each other: checked below), so six
# processes do not each pay for importing torch and the fxforge package.
STANDALONE = (cache_trust, cache_format, cache_mod)

WORKER = r"""
import importlib.util, json, logging, sys, time
from pathlib import Path
role, ident, root, sync = sys.argv[1:5]
for name, path in json.loads(sys.argv[5]):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
cache_mod, cache_format = sys.modules["fxforge.autotune.cache"], sys.modules[
    "fxforge.autotune.cache_format"]
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("fxforge.autotune").addHandler(handler)

def key(which):
    return cache_mod.CacheKey("matmul", "h", {"which": which}, "cpu|test|avx2|threads=1",
                              {"fxforge": "0", "torch": "0", "triton": None}, {})

def record(writer, i):
    return {"config": {"params": {"BLOCK": 16 + i}, "num_warps": 4, "num_stages": 2},
            "writer": writer, "i": i, "pad": "x" * ((i * 997) % 20000)}

def wait_for(name):
    while not Path(sync, name).exists():
        time.sleep(0.005)

cache = cache_mod.TuningCache(root)
Path(sync, f"ready-{role}{ident}").touch()
wait_for("go")
shared = key("shared")
if role == "writer":
    failed = 0
    for i in range(200):
        failed += cache.put(shared, record(ident, i)) is None
        failed += cache.put(key(f"{ident}-{i % 20}"), record(ident, i)) is None
    print(json.dumps({"failed": failed, "warnings": warnings}))
else:
    reads = hits = 0
    bad = []
    path = cache.path_for(shared)
    while not Path(sync, "stop").exists():
        got = cache.get(shared)
        reads += 1
        if got is not None:
            hits += 1
            if hits == 1:   # the test stops the readers only once each has seen the entry
                Path(sync, f"hit-{ident}").touch()
            if got != record(got.get("writer"), got.get("i")):
                bad.append(got)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        entry, problem = cache_format.decode_entry(raw)
        if entry is None:
            bad.append(f"raw read: {problem} ({len(raw)} bytes)")
    print(json.dumps({"reads": reads, "hits": hits, "bad": bad[:5], "warnings": warnings}))
"""


def _spawn(role: str, ident: str, root: Path, sync: Path) -> subprocess.Popen:
    modules = json.dumps([(m.__name__, m.__file__) for m in STANDALONE])
    args = [sys.executable, "-c", WORKER, role, ident, str(root), str(sync), modules]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"worker failed:\n{err}"
    return json.loads(out)


def test_concurrent_writers_and_readers_never_see_a_partial_entry(tmp_path):
    root, sync = tmp_path / "tuning", tmp_path / "sync"
    sync.mkdir()
    writers = [_spawn("writer", str(w), root, sync) for w in range(4)]
    readers = [_spawn("reader", str(r), root, sync) for r in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(list(sync.glob("ready-*"))) < 6:
            assert time.monotonic() < deadline, "workers did not start within 30 s"
            assert all(p.poll() is None for p in writers + readers), "a worker died at start-up"
            time.sleep(0.01)
        (sync / "go").touch()
        written = [_result(p) for p in writers]
        # stop only once every reader has read the entry: a reader starved by a busy machine
        # until after the writers finished must not fail the test for being slow
        while len(list(sync.glob("hit-*"))) < len(readers):
            assert time.monotonic() < deadline + 60, "a reader never read the shared entry"
            assert all(p.poll() is None for p in readers), "a reader died"
            time.sleep(0.01)
        (sync / "stop").touch()
        read = [_result(p) for p in readers]
    finally:
        for proc in writers + readers:
            if proc.poll() is None:
                proc.kill()
    assert written == [{"failed": 0, "warnings": []}] * 4
    for result in read:
        assert result["bad"] == [] and result["warnings"] == []
        assert result["hits"] > 0, f"readers never overlapped the writers: {result}"

    cache = TuningCache(root)
    entries = cache.entries()
    assert len(entries) == 1 + 4 * 20
    stray = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".json")]
    assert stray == []
    final = cache.get(CacheKey("matmul", "h", {"which": "shared"}, "cpu|test|avx2|threads=1",
                               {"fxforge": "0", "torch": "0", "triton": None}, {}))
    assert final is not None and final["i"] == 199  # every writer's last put is its i=199


def test_the_standalone_modules_import_only_the_standard_library_and_each_other():
    """What the module docstrings promise and the workers rely on. Top-level imports only: one
    inside a function runs when it is called (torch, where a key is made from this machine),
    which the workers never do."""
    allowed = {m.__name__ for m in STANDALONE}
    for module in STANDALONE:
        tree = ast.parse(Path(module.__file__).read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top_level if isinstance(node, ast.Import)
                 for alias in node.names]
        names += [node.module for node in top_level if isinstance(node, ast.ImportFrom)]
        outside = [name for name in names if name not in allowed and name != "__future__"
                   and name.split(".")[0] not in sys.stdlib_module_names]
        assert outside == [], f"{module.__name__} imports {outside} at the top level"
