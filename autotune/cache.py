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
(``kernels/cache_trust.py``). Top-level imports are stdlib only (cache_trust's too).
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from fxforge.kernels.cache_trust import cache_root, make_private_dirs, path_problem

log = logging.getLogger("fxforge.autotune")

SCHEMA = 1
BUNDLE_FORMAT = "fxforge-tuning"
RELEVANT_ENV = ("FXFORGE_CPU_ISA", "FXFORGE_CXXFLAGS", "OMP_NUM_THREADS", "TRITON_INTERPRET")
# ISA features that change which config wins; /proc/cpuinfo names, then torch's capability names.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
              "amx_int8")
_TORCH_CAPABILITY_NAMES = {"fma3": "fma", "avx512_f": "avx512f"}
_KEY_TYPES = {"kernel": str, "source_hash": str, "problem": dict, "device": str,
              "versions": dict, "env": dict, "schema": int}

_reported: set[str] = set()  # what this process already warned about (paths, bundles, roots)

PathLike = Union[str, Path]
Entry = tuple[dict, dict]  # (key fields, record)


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
        wrong = [n for n, kind in _KEY_TYPES.items() if not isinstance(getattr(self, n), kind)]
        if wrong:  # caught here, not as a "corrupt" entry on every later read
            raise TypeError(f"CacheKey fields of the wrong type: {', '.join(wrong)}")

    @staticmethod
    def make(kernel: str, source_hash: str, problem: dict, device: str = "cpu") -> "CacheKey":
        env = {name: os.environ.get(name) for name in RELEVANT_ENV}
        return CacheKey(kernel, source_hash, problem, device_identity(device), current_versions(),
                        env)

    @staticmethod
    def from_fields(fields: Any) -> "CacheKey":
        problem = _key_fields_problem(fields)
        if problem:
            raise ValueError(f"invalid cache key: {problem}")
        return CacheKey(**fields)

    def fields(self) -> dict:
        return {name: json.loads(json.dumps(getattr(self, name))) for name in _KEY_TYPES}

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.fields()).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and self.digest() == other.digest()

    def __hash__(self) -> int:
        return hash(self.digest())


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _checksum(key: Any, record: Any) -> str:
    return hashlib.sha256(_canonical({"key": key, "record": record}).encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key_fields_problem(fields: Any) -> Optional[str]:
    if not isinstance(fields, dict) or set(fields) != set(_KEY_TYPES):
        return "key is not a dict with exactly the fields " + ", ".join(_KEY_TYPES)
    for name, kind in _KEY_TYPES.items():
        if not isinstance(fields[name], kind) or isinstance(fields[name], bool):
            return f"key field {name!r} is not a {kind.__name__}"
    return None if fields["schema"] == SCHEMA else f"key schema {fields['schema']} != {SCHEMA}"


def _config_problem(config: Any) -> Optional[str]:
    if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
        return "config is not a dict with a 'params' dict"
    if not all(isinstance(k, str) and _is_int(v) for k, v in config["params"].items()):
        return "config params are not all str -> int"
    if not (_is_int(config.get("num_warps")) and _is_int(config.get("num_stages"))):
        return "config num_warps/num_stages are not ints"
    return None


def _record_problem(record: Any) -> Optional[str]:
    if not isinstance(record, dict) or "config" not in record:
        return "record is not a dict with a 'config'"
    return _config_problem(record["config"])


def _entry_problem(doc: Any) -> Optional[str]:
    """What is wrong with a stored ``{key, record, checksum}`` entry, or None."""
    if not isinstance(doc, dict) or set(doc) != {"key", "record", "checksum"}:
        return "not an entry (expected exactly key, record, checksum)"
    if doc["checksum"] != _checksum(doc["key"], doc["record"]):
        return "checksum mismatch"
    return _key_fields_problem(doc["key"]) or _record_problem(doc["record"])


def _decode_entry(raw: bytes) -> tuple[Optional[Entry], str]:
    """(key fields, record) of a stored entry, or (None, what is wrong with it)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({type(exc).__name__}; truncated or garbage?)"
    problem = _entry_problem(doc)
    return (None, problem) if problem else ((doc["key"], doc["record"]), "")


def _entry_doc(fields: dict, record: dict) -> dict:
    return {"key": fields, "record": record, "checksum": _checksum(fields, record)}


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; bundles travel with artifacts
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def config_to_json(config: Any) -> dict:
    return config.to_json()


def config_from_json(data: Any) -> Any:
    """``Config.from_json`` with the cache's stricter checks of the record's config."""
    from fxforge.kernels.tuning import Config
    problem = _config_problem(data)
    if problem:
        raise ValueError(f"invalid tuning config {data!r}: {problem}")
    return Config.from_json(data)


class TuningCache:
    """Entries on disk under ``root`` plus an optional read-only in-memory overlay."""

    def __init__(self, root: Optional[PathLike] = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "autotune"
        self._trust_root = Path(root) if root is not None else cache_root()   # ours from here
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
        problem = _record_problem(record)
        if problem:
            raise ValueError(f"TuningCache.put: invalid record for {key.kernel}: {problem}")
        fields = key.fields()
        text = json.dumps(_entry_doc(fields, record), sort_keys=True, indent=1)
        path = self.path_for(key)
        try:
            problem = make_private_dirs(path.parent, self._trust_root)
            if problem:
                _warn_once(problem, f"tuning cache: {problem}; not writing tuning results there")
                return None
            _atomic_write(path, text)
        except OSError as exc:
            _warn_once(f"write:{self.root}", f"tuning cache: cannot write under {self.root} "
                       f"({exc}); tuning results will not persist")
            return None
        _reported.discard(str(path))  # repaired: a later corruption is worth a new warning
        return path

    def _read(self, path: Path) -> Optional[Entry]:
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) there
            return None
        except OSError as exc:
            _warn_once(str(path), f"tuning cache: cannot read {path} ({exc}); ignored")
            return None
        untrusted = path_problem(path, self._trust_root)   # only we may have written it
        if untrusted:
            _warn_once(untrusted, f"tuning cache: {untrusted}; its entries are ignored")
            return None
        entry, problem = _decode_entry(raw)
        if entry is None:
            _warn_once(str(path), f"tuning cache: {path} is corrupt ({problem}); ignored")
        return entry

    def entries(self) -> list[Entry]:
        """(key fields, record) of every valid entry on disk (the overlay is not included)."""
        found = (self._read(path) for path in sorted(self.root.glob("*/*.json")))
        return [entry for entry in found if entry is not None]

    def export(self, path: PathLike, keys: Optional[Iterable[CacheKey]] = None) -> int:
        """Write a bundle of all entries (or those of ``keys`` that hit); returns the count."""
        if keys is None:
            chosen = self.entries()
        else:
            chosen = [(key.fields(), record) for key in keys
                      if (record := self.get(key)) is not None]
        bundle = {"format": BUNDLE_FORMAT, "schema": SCHEMA,
                  "entries": [_entry_doc(fields, record) for fields, record in chosen]}
        _atomic_write(Path(path), json.dumps(bundle, sort_keys=True, indent=1))
        return len(chosen)

    def import_(self, path: PathLike, *, overwrite: bool = True) -> int:
        """Copy a bundle's valid entries to disk; returns how many were written."""
        written = 0
        for fields, record in _read_bundle(Path(path)):
            key = CacheKey(**fields)
            if overwrite or self._stored(key) is None:
                written += self.put(key, record) is not None
        return written

    def add_overlay(self, source: Union[PathLike, Iterable[Entry]]) -> int:
        """Serve a bundle file's (or the given) entries read-only, ahead of the disk."""
        found = _read_bundle(Path(source)) if isinstance(source, (str, Path)) else list(source)
        for fields, record in found:
            problem = _key_fields_problem(fields) or _record_problem(record)
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


def _bundle_doc(path: Path) -> tuple[Optional[dict], str]:
    """A bundle file's document, or (None, why it is not one)."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"is unreadable ({type(exc).__name__}: {exc})"
    if (not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT
            or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), list)):
        return None, f"is not a schema-{SCHEMA} {BUNDLE_FORMAT} bundle"
    return doc, ""


def bundle_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` is not a bundle whose every entry is valid, or None. An AOT artifact's
    bundle must be one; other bundles only lose their bad entries (``_read_bundle``)."""
    doc, problem = _bundle_doc(Path(path))
    if doc is None:
        return problem
    return next((f"holds an invalid entry ({p})" for p in map(_entry_problem, doc["entries"]) if p),
                None)


def _read_bundle(path: Path) -> list[Entry]:
    """A bundle's valid entries; bad content gets one warning per call, never an exception."""
    doc, problem = _bundle_doc(path)
    if doc is None:
        log.warning("tuning bundle %s %s; ignored", path, problem)
        return []
    valid, reasons = [], []
    for item in doc["entries"]:
        problem = _entry_problem(item)
        if problem:
            reasons.append(problem)
        else:
            valid.append((item["key"], item["record"]))
    if reasons:
        log.warning("tuning bundle %s: skipped %d invalid entr%s (first: %s)", path, len(reasons),
                    "y" if len(reasons) == 1 else "ies", reasons[0])
    return valid
