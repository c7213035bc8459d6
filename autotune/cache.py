"""The persistent autotuning cache: one JSON file per tuned (kernel, problem, device, versions) key.

Layout: ``<cache_root()>/autotune/<kernel>/<digest[:40]>.json``, each file holding
``{"key": fields, "record": record, "checksum": sha256}``. Writers go through a temp file in
the same folder and ``os.replace``, so concurrent processes never see a partial entry and no
lock is needed (last writer wins). Everything read back is validated: a truncated, garbage or
mismatched entry is reported once per path and treated as a miss -- a bad file can cost a
re-tune, never a crash or a wrong config. A key covers everything that changes the best config
(kernel source hash, problem bucket, device identity, fxforge/torch/triton versions, the
relevant environment), so an upgrade simply misses. ``export``/``import_`` move entries in one
bundle file ``{"format", "schema", "entries": [entry, ...]}`` (shipped inside an AOT artifact);
an overlay serves such a bundle read-only.

Folders and entries another user owns or can write are reported once and ignored
(``kernels/cache_trust.py``). The entry and bundle formats and their checks are in
``cache_format.py``. This module's own top-level imports are the standard library and those
two modules, whose own are stdlib only: the three load from their files alone (each registered
under its name first), which spares the concurrency test's worker processes torch (a test
checks it). Imported as ``fxforge.autotune.cache`` it imports the ``fxforge`` package (torch)
first, like any submodule.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from fxforge.autotune.cache_format import (BUNDLE_FORMAT, KEY_TYPES, SCHEMA, Entry, canonical,
                                           config_problem, decode_entry, entry_doc,
                                           key_fields_problem, read_bundle, record_problem)
from fxforge.kernels.cache_trust import (UntrustedCacheError, cache_root, make_private_dirs,
                                         path_problem, read_private, resolve_root, write_atomic)

log = logging.getLogger("fxforge.autotune")

RELEVANT_ENV = ("FXFORGE_CPU_ISA", "FXFORGE_CXXFLAGS", "OMP_NUM_THREADS", "TRITON_INTERPRET")
# ISA features that change which config wins; /proc/cpuinfo names, then torch's capability names.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
              "amx_int8")
_TORCH_CAPABILITY_NAMES = {"fma3": "fma", "avx512_f": "avx512f"}

_reported: set[str] = set()  # what this process already warned about (paths, bundles, roots)

PathLike = Union[str, Path]


def _warn_once(tag: str, message: str) -> None:
    if tag not in _reported:
        _reported.add(tag)
        log.warning(message)


@functools.lru_cache(maxsize=1)
def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # not installed, or a broken install that fails on import
        return None
    return getattr(triton, "__version__", None)


def current_versions() -> dict:
    import torch

    import fxforge
    return {"fxforge": fxforge.__version__, "torch": torch.__version__, "triton": _triton_version()}


@functools.lru_cache(maxsize=1)
def _cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = set(value.split())
    import torch
    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
    flags |= {_TORCH_CAPABILITY_NAMES.get(k, k) for k, on in capabilities.items() if on is True}
    model = model or platform.processor() or str(capabilities.get("cpu_name", "unknown"))
    model = " ".join(model.replace("|", "/").split())
    return model, tuple(f for f in _ISA_FLAGS if f in flags)


def device_identity(device: str = "cpu") -> str:
    """What the best config depends on: CPU model, ISA and threads; or GPU name and capability."""
    import torch
    if device == "cpu":
        model, flags = _cpu_model_and_flags()
        return f"cpu|{model}|{','.join(flags)}|threads={torch.get_num_threads()}"
    if device == "cuda" or device.startswith("cuda:"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda|{torch.cuda.get_device_name(index)}|sm{major}{minor}"
    raise ValueError(f"device_identity: unsupported device {device!r} (want 'cpu' or 'cuda[:N]')")


def _jsonable(value: Any) -> Any:
    if type(value).__name__ == "dtype" and str(value).startswith("torch."):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cache key values must be JSON-able, got {type(value).__name__}: {value!r}")


@dataclass(frozen=True, eq=False)
class CacheKey:
    """Identifies one tuning result. Equality and hash go through :meth:`digest`."""
    kernel: str
    source_hash: str
    problem: dict
    device: str
    versions: dict
    env: dict
    schema: int = SCHEMA

    def __post_init__(self) -> None:  # private JSON copies: torch dtypes become names
        for name in ("problem", "versions", "env"):
            plain = json.loads(json.dumps(getattr(self, name), default=_jsonable, sort_keys=True))
            object.__setattr__(self, name, plain)
        wrong = [n for n, kind in KEY_TYPES.items() if not isinstance(getattr(self, n), kind)]
        if wrong:  # caught here, not as a "corrupt" entry on every later read
            raise TypeError(f"CacheKey fields of the wrong type: {', '.join(wrong)}")

    @staticmethod
    def make(kernel: str, source_hash: str, problem: dict, device: str = "cpu") -> "CacheKey":
        env = {name: os.environ.get(name) for name in RELEVANT_ENV}
        return CacheKey(kernel, source_hash, problem, device_identity(device), current_versions(),
                        env)

    @staticmethod
    def from_fields(fields: Any) -> "CacheKey":
        problem = key_fields_problem(fields)
        if problem:
            raise ValueError(f"invalid cache key: {problem}")
        return CacheKey(**fields)

    def fields(self) -> dict:
        return {name: json.loads(json.dumps(getattr(self, name))) for name in KEY_TYPES}

    def digest(self) -> str:
        return hashlib.sha256(canonical(self.fields()).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and self.digest() == other.digest()

    def __hash__(self) -> int:
        return hash(self.digest())


def config_to_json(config: Any) -> dict:
    return config.to_json()


def config_from_json(data: Any) -> Any:
    """``Config.from_json`` with the cache's stricter checks of the record's config."""
    from fxforge.kernels.tuning import Config
    problem = config_problem(data)
    if problem:
        raise ValueError(f"invalid tuning config {data!r}: {problem}")
    return Config.from_json(data)


class TuningCache:
    """Entries on disk under ``root`` plus an optional read-only in-memory overlay."""

    def __init__(self, root: Optional[PathLike] = None) -> None:
        # resolved once, as the kernel cache's root: links on the way are judged here, then the
        # real path is all that is used; the rule holds from the trust root down
        self._trust_root, self._link_problem = resolve_root(
            Path(root) if root is not None else cache_root())
        self.root = self._trust_root if root is not None else self._trust_root / "autotune"
        self._overlay: dict[str, Entry] = {}

    def path_for(self, key: CacheKey) -> Path:
        folder = re.sub(r"[^A-Za-z0-9._-]", "_", key.kernel)[:80].lstrip(".") or "_"
        return self.root / folder / f"{key.digest()[:40]}.json"

    def get(self, key: CacheKey) -> Optional[dict]:
        """The record stored for ``key``, or None (miss, or a bad entry: reported once)."""
        hit = self._overlay.get(key.digest())
        if hit is not None and hit[0] == key.fields():
            return json.loads(json.dumps(hit[1]))
        return self._stored(key)

    def _stored(self, key: CacheKey) -> Optional[dict]:
        path = self.path_for(key)
        entry = self._read(path)
        if entry is not None and entry[0] != key.fields():
            _warn_once(str(path), f"tuning cache: {path} holds a different key; ignored")
            return None
        return None if entry is None else entry[1]

    def put(self, key: CacheKey, record: dict) -> Optional[Path]:
        """Store ``record``; None when the cache cannot be written (warned once, never raised)."""
        problem = record_problem(record)
        if problem:
            raise ValueError(f"TuningCache.put: invalid record for {key.kernel}: {problem}")
        fields = key.fields()
        text = json.dumps(entry_doc(fields, record), sort_keys=True, indent=1)
        path = self.path_for(key)
        try:
            problem = self._link_problem or make_private_dirs(path.parent, self._trust_root)
            if problem:
                _warn_once(problem, f"tuning cache: {problem}; not writing tuning results there")
                return None
            write_atomic(path, text.encode())
        except OSError as exc:
            _warn_once(f"write:{self.root}", f"tuning cache: cannot write under {self.root} "
                       f"({exc}); tuning results will not persist")
            return None
        _reported.discard(str(path))  # repaired: a later corruption is worth a new warning
        return path

    def _folder_trusted(self, folder: Path) -> bool:
        """Whether the rule holds for ``folder`` and every folder from the trust root down to it
        (a problem is warned once); raises FileNotFoundError if it does not exist."""
        untrusted = self._link_problem or path_problem(folder, self._trust_root)
        if untrusted:
            _warn_once(untrusted, f"tuning cache: {untrusted}; its entries are ignored")
        return not untrusted

    def _read(self, path: Path, folder_checked: bool = False) -> Optional[Entry]:
        """The valid entry in ``path``; only what we wrote is read: the folders are checked first
        (unless ``folder_checked``), the file on the descriptor it is read from."""
        try:
            if not folder_checked and not self._folder_trusted(path.parent):
                return None
            raw = read_private(path)
        except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) there
            return None
        except UntrustedCacheError as exc:
            _warn_once(str(exc), f"tuning cache: {exc}; ignored")
            return None
        except OSError as exc:
            _warn_once(str(path), f"tuning cache: cannot read {path} ({exc}); ignored")
            return None
        entry, problem = decode_entry(raw)
        if entry is None:
            _warn_once(str(path), f"tuning cache: {path} is corrupt ({problem}); ignored")
        return entry

    def entries(self) -> list[Entry]:
        """(key fields, record) of every valid entry on disk (the overlay is not included); each
        kernel folder's chain is checked once, not once per entry."""
        found = []
        for folder in sorted(p for p in self.root.glob("*") if p.is_dir()):
            try:
                if not self._folder_trusted(folder):
                    continue
            except FileNotFoundError:   # removed meanwhile (clear)
                continue
            found += [self._read(path, folder_checked=True)
                      for path in sorted(folder.glob("*.json"))]
        return [entry for entry in found if entry is not None]

    def export(self, path: PathLike, keys: Optional[Iterable[CacheKey]] = None) -> int:
        """Write a bundle of all entries (or those of ``keys`` that hit); returns the count."""
        if keys is None:
            chosen = self.entries()
        else:
            chosen = [(key.fields(), record) for key in keys
                      if (record := self.get(key)) is not None]
        bundle = {"format": BUNDLE_FORMAT, "schema": SCHEMA,
                  "entries": [entry_doc(fields, record) for fields, record in chosen]}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # 0644: a bundle travels with an artifact, to other users
        write_atomic(Path(path), json.dumps(bundle, sort_keys=True, indent=1).encode(), 0o644)
        return len(chosen)

    def import_(self, path: PathLike, *, overwrite: bool = True) -> int:
        """Copy a bundle's valid entries to disk; returns how many were written."""
        written = 0
        for fields, record in read_bundle(Path(path)):
            key = CacheKey(**fields)
            if overwrite or self._stored(key) is None:
                written += self.put(key, record) is not None
        return written

    def add_overlay(self, source: Union[PathLike, Iterable[Entry]]) -> int:
        """Serve a bundle file's (or the given) entries read-only, ahead of the disk."""
        found = read_bundle(Path(source)) if isinstance(source, (str, Path)) else list(source)
        for fields, record in found:
            problem = key_fields_problem(fields) or record_problem(record)
            if problem:
                raise ValueError(f"add_overlay: invalid entry: {problem}")
            key = CacheKey(**fields)
            self._overlay[key.digest()] = (key.fields(), json.loads(json.dumps(record)))
        return len(found)

    @classmethod
    def with_overlay(cls, entries: Iterable[Entry],
                     root: Optional[PathLike] = None) -> "TuningCache":
        cache = cls(root)
        cache.add_overlay(entries)
        return cache

    def clear(self) -> None:
        """Delete every entry (and stray temp file) on disk; the overlay stays."""
        for path in list(self.root.glob("*/*.json")) + list(self.root.glob("*/.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty kernel folders go
