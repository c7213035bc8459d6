"""A persistent cache of whole compiled graphs: a second process skips capture's aot_autograd,
freezing, the passes and the KV step, and only lowers the stored graph.

The key is what the optimized graph depends on, read from dynamo's graph before aot_autograd
runs (:func:`graph_key`): the code of every GraphModule in it, each input's dtype, shape,
strides and device (symbolic sizes by name), a digest of the weights' bytes (the optimized
graph holds constants folded from them; ``kernels/content_digest.py``), the options,
the CPU features the passes see (``FXFORGE_CPU_ISA`` included), fxforge's own source and the
torch/triton versions. Graphs with lossy options are not cached: their passes calibrate on the
example inputs or measure kernel speeds, so the same key would not give the same graph.

An entry, ``<cache root>/graphs/<key>/``, is an AOT artifact's files (the graph, the step graph
and their constants as JSON and safetensors: data, never pickles; :mod:`fxforge.irgraph.serialize`
decides what a stored graph may call) plus ``entry.json``: format, versions, the digest of every
file, the KV-cache plan and where the weights sit among the inputs. It is written into a private
temporary folder, then renamed into place in one step; a reader checks ownership and permissions
as for kernels (:mod:`fxforge.kernels.cache_trust`), then every digest. An entry that fails any
check is reported in one warning, removed and rebuilt. ``FXFORGE_GRAPH_CACHE=0`` turns the cache
off; ``FXFORGE_GRAPH_CACHE_GB`` (default 8) caps its size, least recently used entries going first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("fxforge")
CACHE_FORMAT = 1
FOLDER = "graphs"
ENTRY, GRAPH, STEP_GRAPH, WEIGHTS = "entry.json", "graph.json", "step_graph.json", "weights.safetensors"
DEFAULT_LIMIT_GB = 8.0
# Environment variables that only say where things go or what is printed: not in the key.
_ENV_NOT_KEYED = {"FXFORGE_CACHE_DIR", "FXFORGE_PROFILE", "FXFORGE_GRAPH_CACHE",
                  "FXFORGE_GRAPH_CACHE_GB"}
_off = threading.local()   # per thread: a ``disabled()`` block is open


def enabled() -> bool:
    return os.environ.get("FXFORGE_GRAPH_CACHE", "1") != "0" and not getattr(_off, "depth", 0)


@contextlib.contextmanager
def disabled():
    """No lookups or stores inside the block (``fxforge.explain`` reports the passes it runs)."""
    _off.depth = getattr(_off, "depth", 0) + 1
    try:
        yield
    finally:
        _off.depth -= 1


class CacheEntryError(Exception):
    """Why a stored entry cannot be used."""


# --- the key ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over fxforge's Python sources: a changed pass or kernel rule changes every key."""
    import importlib
    digest = hashlib.sha256()
    for package in ("fxforge", "fxforge.irgraph", "fxforge.passes", "fxforge.backends",
                    "fxforge.kernels", "fxforge.autotune"):
        folder = Path(importlib.import_module(package).__file__).parent
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{package}/{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _input_spec(value: Any) -> Optional[str]:
    """One input as the key sees it; None for an input kind the cache does not handle."""
    if isinstance(value, torch.Tensor):
        return (f"T{value.dtype}|{[str(s) for s in value.shape]}|{[str(s) for s in value.stride()]}"
                f"|{value.device.type}|{value.requires_grad}")
    if isinstance(value, torch.SymInt):
        return f"S{value.node.expr}"
    if isinstance(value, (bool, int, float)):
        return f"V{type(value).__name__}:{value!r}"
    return None


def _weights_digest(weights: Sequence[torch.Tensor]) -> str:
    """A digest of the weights' bytes (a tied weight, passed twice, read once)."""
    from fxforge.kernels.content_digest import tensor_digest
    digest = hashlib.sha256()
    seen: dict[tuple, int] = {}
    for index, weight in enumerate(weights):
        ident = (weight.data_ptr(), weight.dtype, tuple(weight.shape), tuple(weight.stride()))
        if ident in seen and weight.data_ptr():
            digest.update(f"={seen[ident]}\0".encode())
            continue
        seen[ident] = index
        digest.update(f"{weight.dtype}{tuple(weight.shape)}:{tensor_digest(weight)}\0".encode())
    return digest.hexdigest()


def graph_key(gm: fx.GraphModule, example_inputs: Sequence[Any], weight_indices: Sequence[int],
              options: Any) -> Optional[str]:
    """The entry's name for dynamo's graph ``gm`` (module docstring), or None where the cache
    does not apply: lossy options, an input or constant it cannot describe."""
    from fxforge.autotune.cache import current_versions
    from fxforge.kernels.cpu_isa import cpu_features
    from fxforge.kernels.content_digest import tensor_digest
    if options.lossy or options.tensor_parallel or not enabled():
        return None   # tensor_parallel: the graph is this rank's, its collectives this process's
    specs = [_input_spec(value) for value in example_inputs]
    if any(spec is None for spec in specs):
        return None
    digest = hashlib.sha256()
    fields = {"format": CACHE_FORMAT, "versions": current_versions(), "source": source_digest(),
              "options": options.to_dict(), "cpu": repr(cpu_features()),
              "env": {k: v for k, v in sorted(os.environ.items())
                      if k.startswith("FXFORGE_") and k not in _ENV_NOT_KEYED},
              "inputs": specs, "weights": list(weight_indices)}
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, module in gm.named_modules():
        if isinstance(module, fx.GraphModule):
            digest.update(f"\0module {name}\0{module.code}".encode())
    for node in gm.graph.nodes:   # constants dynamo left as attributes
        if node.op == "get_attr":
            value = getattr(gm, str(node.target), None) if "." not in str(node.target) else None
            if not isinstance(value, torch.Tensor):
                return None
            digest.update(f"\0attr {node.target} {value.dtype}{tuple(value.shape)}:"
                          f"{tensor_digest(value)}\0".encode())
    digest.update(_weights_digest([example_inputs[i] for i in weight_indices]).encode())
    return digest.hexdigest()[:40]


# --- the folder ---------------------------------------------------------------------------------

def cache_folder() -> Path:
    from fxforge.kernels.cache_trust import trusted_dir
    return trusted_dir(FOLDER)


def _entry_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _evict(root: Path, limit_bytes: float) -> None:
    """Remove the least recently used entries (by their ``entry.json``'s time) over the cap."""
    entries = []
    for folder in root.iterdir():
        with contextlib.suppress(OSError):
            if folder.is_dir() and not folder.name.startswith("."):
                entries.append(((folder / ENTRY).stat().st_mtime, _entry_size(folder), folder))
    total = sum(size for _, size, _ in entries)
    for _, size, folder in sorted(entries, key=lambda e: e[0]):
        if total <= limit_bytes:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        log.info("fxforge: graph cache over %.1f GB: removed entry %s", limit_bytes / 2**30, folder.name)


def _limit_bytes() -> float:
    try:
        return float(os.environ.get("FXFORGE_GRAPH_CACHE_GB", DEFAULT_LIMIT_GB)) * 2**30
    except ValueError:
        return DEFAULT_LIMIT_GB * 2**30


@dataclasses.dataclass
class Stored:
    """A graph as the cache keeps it: the optimized IR, its KV plan, and the calling layout."""
    ir: Any
    plan: Any
    weight_positions: list[int]
    info: dict


def _size_hints(ir) -> dict[str, int]:
    """The example size of each symbolic input size (kernel builders read example values)."""
    hints: dict[str, int] = {}
    for placeholder in ir.placeholders():
        value = placeholder.meta.get("val")
        for size in getattr(value, "shape", ()):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and size.node.hint:
                hints[str(size.node.expr)] = int(size.node.hint)
    return hints


def store(key: str, ir, plan, weight_positions: Sequence[int]) -> None:
    """Write the entry for ``key`` (module docstring); a failure is logged, never raised."""
    from safetensors.torch import save_file

    from fxforge.aot import _all_constants, _dedup_constants, _graph_json
    from fxforge.kernels.content_digest import file_digest
    from fxforge.autotune.cache import current_versions
    from fxforge.errors import ArtifactError
    from fxforge.kernels.cache_trust import UntrustedCacheError
    start = time.perf_counter()
    tmp = None
    try:
        root = cache_folder()
        if (root / key).exists():
            return
        texts = {GRAPH: _graph_json(ir)}
        if plan is not None:
            texts[STEP_GRAPH] = _graph_json(plan.ir)
        unique, aliases = _dedup_constants(_all_constants(ir, plan))
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        save_file(unique, str(tmp / WEIGHTS))
        for name, text in texts.items():
            (tmp / name).write_text(text)
        entry = {"format": CACHE_FORMAT, "versions": current_versions(), "aliases": aliases,
                 "files": {name: file_digest(tmp / name) for name in (WEIGHTS, *texts)},
                 "kv_cache": plan.to_json() if plan is not None else None,
                 "weight_positions": list(weight_positions), "hints": _size_hints(ir),
                 "precision": ir.info.get("precision", "fp32")}
        (tmp / ENTRY).write_text(json.dumps(entry, indent=1))
        for path in tmp.iterdir():
            os.chmod(path, 0o600)
        try:
            os.rename(tmp, root / key)   # one step: a reader sees no entry or a whole one
        except OSError:
            if (root / key).exists():    # another process stored the same entry first
                return
            raise
        tmp = None
        log.info("fxforge: graph cache: stored entry %s in %.1f s", key, time.perf_counter() - start)
        _evict(root, _limit_bytes())
    except (OSError, ArtifactError, UntrustedCacheError, ValueError) as exc:
        log.warning("fxforge: graph cache: could not store entry %s (%s: %s)", key,
                    type(exc).__name__, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load(key: str) -> Optional[Stored]:
    """The entry for ``key``, or None: absent, or unusable (one warning; the entry is removed so
    that the compile that follows stores a good one)."""
    from fxforge.kernels.cache_trust import UntrustedCacheError
    try:
        folder = cache_folder() / key
    except UntrustedCacheError:
        return None
    if not folder.exists():
        return None
    try:
        stored = _read(folder)
    except CacheEntryError as exc:
        log.warning("fxforge: graph cache entry %s is unusable (%s): ignored and removed; "
                    "compiling the graph again", key, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(folder / ENTRY)   # recently used: evicted last
    return stored


def _read(folder: Path) -> Stored:
    """The entry in ``folder``, checked (module docstring); CacheEntryError says what is wrong."""
    from fxforge.artifact_checks import load_weights
    from fxforge.autotune.cache import current_versions
    from fxforge.irgraph import ir_from_json
    from fxforge.irgraph.meta import restore_example_values
    from fxforge.kernels.cache_trust import cached_file_problem, read_private
    from fxforge.kernels.content_digest import file_digest
    from fxforge.passes.kv_cache import KVCachePlan
    try:
        problem = cached_file_problem(folder) or cached_file_problem(folder / ENTRY)
        if problem:
            raise CacheEntryError(problem)
        entry = json.loads(read_private(folder / ENTRY))
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            raise CacheEntryError("not an entry of this cache format")
        if entry.get("versions") != current_versions():
            raise CacheEntryError(f"written by {entry.get('versions')}, this is {current_versions()}")
        files = entry.get("files")
        expected = {GRAPH, WEIGHTS} | ({STEP_GRAPH} if entry.get("kv_cache") else set())
        if not isinstance(files, dict) or set(files) != expected:
            raise CacheEntryError(f"lists files {sorted(files) if isinstance(files, dict) else files}")
        for name, digest in files.items():
            problem = cached_file_problem(folder / name)
            if problem:
                raise CacheEntryError(problem)
            if file_digest(folder / name) != digest:
                raise CacheEntryError(f"{name} does not have the digest its entry records")
        constants = load_weights(folder / WEIGHTS)
        for alias, canonical in dict(entry.get("aliases") or {}).items():
            constants[alias] = constants[canonical]
        ir = ir_from_json(json.loads((folder / GRAPH).read_text()), constants)
        plan = None
        if entry.get("kv_cache"):
            step = ir_from_json(json.loads((folder / STEP_GRAPH).read_text()), constants,
                                writable_inputs=entry["kv_cache"]["caches"])
            plan = KVCachePlan.from_json(step, entry["kv_cache"])
        hints = {str(k): int(v) for k, v in dict(entry.get("hints") or {}).items()}
        for graph in (ir, plan.ir) if plan is not None else (ir,):
            why = restore_example_values(graph.gm, hints)
            if why is not None:
                raise CacheEntryError(f"no example values for its graph ({why})")
        ir.info["precision"] = str(entry.get("precision", "fp32"))
        positions = [int(p) for p in entry["weight_positions"]]
    except CacheEntryError:
        raise
    except Exception as exc:   # unreadable, malformed or refused by ir_from_json: a bad entry
        raise CacheEntryError(f"{type(exc).__name__}: {exc}") from None
    return Stored(ir, plan, positions, {"capture": "graph cache", "plain_outputs": True})
