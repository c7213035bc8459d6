"""What the tuning cache stores, and the checks on everything read back.

An entry is ``{"key": fields, "record": record, "checksum": sha256}`` (one JSON file per key,
see ``cache.py``); a bundle is ``{"format", "schema", "entries": [entry, ...]}`` (shipped inside
an AOT artifact). Each check returns what is wrong, or None: a bad file costs a re-tune, never
a crash or a wrong config. Imports are stdlib only (``cache.py`` says why).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

log = logging.getLogger("fxforge.autotune")

SCHEMA = 1
BUNDLE_FORMAT = "fxforge-tuning"
KEY_TYPES = {"kernel": str, "source_hash": str, "problem": dict, "device": str,
             "versions": dict, "env": dict, "schema": int}

Entry = tuple[dict, dict]  # (key fields, record)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def checksum(key: Any, record: Any) -> str:
    return hashlib.sha256(canonical({"key": key, "record": record}).encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def key_fields_problem(fields: Any) -> Optional[str]:
    if not isinstance(fields, dict) or set(fields) != set(KEY_TYPES):
        return "key is not a dict with exactly the fields " + ", ".join(KEY_TYPES)
    for name, kind in KEY_TYPES.items():
        if not isinstance(fields[name], kind) or isinstance(fields[name], bool):
            return f"key field {name!r} is not a {kind.__name__}"
    return None if fields["schema"] == SCHEMA else f"key schema {fields['schema']} != {SCHEMA}"


def config_problem(config: Any) -> Optional[str]:
    if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
        return "config is not a dict with a 'params' dict"
    if not all(isinstance(k, str) and _is_int(v) for k, v in config["params"].items()):
        return "config params are not all str -> int"
    if not (_is_int(config.get("num_warps")) and _is_int(config.get("num_stages"))):
        return "config num_warps/num_stages are not ints"
    return None


def record_problem(record: Any) -> Optional[str]:
    if not isinstance(record, dict) or "config" not in record:
        return "record is not a dict with a 'config'"
    return config_problem(record["config"])


def entry_problem(doc: Any) -> Optional[str]:
    """What is wrong with a stored ``{key, record, checksum}`` entry, or None."""
    if not isinstance(doc, dict) or set(doc) != {"key", "record", "checksum"}:
        return "not an entry (expected exactly key, record, checksum)"
    if doc["checksum"] != checksum(doc["key"], doc["record"]):
        return "checksum mismatch"
    return key_fields_problem(doc["key"]) or record_problem(doc["record"])


def decode_entry(raw: bytes) -> tuple[Optional[Entry], str]:
    """(key fields, record) of a stored entry, or (None, what is wrong with it)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({type(exc).__name__}; truncated or garbage?)"
    problem = entry_problem(doc)
    return (None, problem) if problem else ((doc["key"], doc["record"]), "")


def entry_doc(fields: dict, record: dict) -> dict:
    return {"key": fields, "record": record, "checksum": checksum(fields, record)}


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


def bundle_problem(path: Union[str, Path]) -> Optional[str]:
    """Why ``path`` is not a bundle whose every entry is valid, or None. An AOT artifact's
    bundle must be one; other bundles only lose their bad entries (``read_bundle``)."""
    doc, problem = _bundle_doc(Path(path))
    if doc is None:
        return problem
    return next((f"holds an invalid entry ({p})" for p in map(entry_problem, doc["entries"]) if p),
                None)


def read_bundle(path: Path) -> list[Entry]:
    """A bundle's valid entries; bad content gets one warning per call, never an exception."""
    doc, problem = _bundle_doc(path)
    if doc is None:
        log.warning("tuning bundle %s %s; ignored", path, problem)
        return []
    valid, reasons = [], []
    for item in doc["entries"]:
        problem = entry_problem(item)
        if problem:
            reasons.append(problem)
        else:
            valid.append((item["key"], item["record"]))
    if reasons:
        log.warning("tuning bundle %s: skipped %d invalid entr%s (first: %s)", path, len(reasons),
                    "y" if len(reasons) == 1 else "ies", reasons[0])
    return valid
