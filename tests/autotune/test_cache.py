"""The persistent tuning cache: keys, round trips, corruption, export/import (concurrency:
``test_cache_concurrency.py``)."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import fxforge
from fxforge.autotune import cache as cache_mod
from fxforge.autotune import cache_format
from fxforge.autotune.cache import (CacheKey, TuningCache, cache_root, config_from_json,
                                    config_to_json, current_versions, device_identity)
from fxforge.kernels.tuning import Config

VERSIONS = {"fxforge": "0.1.0", "torch": "2.13.0", "triton": "3.9.0"}


def make_key(**overrides) -> CacheKey:
    fields = dict(kernel="matmul", source_hash="abc123", problem={"M": 128, "K": 576, "N": 1728,
                  "dtype": "float32"}, device="cpu|Test CPU|avx2,fma|threads=2",
                  versions=dict(VERSIONS), env={"OMP_NUM_THREADS": "1"})
    fields.update(overrides)
    return CacheKey(**fields)


def make_record(block: int = 64, **extra) -> dict:
    return {"config": {"params": {"BLOCK_M": block, "BLOCK_N": 32}, "num_warps": 4,
                       "num_stages": 2}, "best_time": 1.5e-4, **extra}


def warnings_about(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fxforge.autotune" and r.levelno == logging.WARNING
            and str(path) in r.getMessage()]


@pytest.fixture
def cache(tmp_path) -> TuningCache:
    return TuningCache(tmp_path / "tuning")


# --- keys and locations -------------------------------------------------------------------------

def test_cache_root_env_override_and_xdg_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "forced"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "forced"
    assert TuningCache().root == tmp_path / "forced" / "autotune"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", "")  # empty means unset
    assert cache_root() == tmp_path / "xdg" / "fxforge"
    monkeypatch.delenv("FXFORGE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "fxforge"


def test_make_fills_identity_versions_and_env(monkeypatch):
    monkeypatch.setenv("FXFORGE_CPU_ISA", "avx2")
    key = CacheKey.make("matmul", "abc", {"M": 64, "dtype": torch.bfloat16})
    assert key.problem == {"M": 64, "dtype": "bfloat16"}
    assert key.versions == current_versions()
    assert key.versions["fxforge"] == fxforge.__version__
    assert key.versions["torch"] == torch.__version__
    assert key.env["FXFORGE_CPU_ISA"] == "avx2"
    assert key.device == device_identity("cpu")
    assert json.loads(json.dumps(key.fields())) == key.fields()


def test_device_identity_names_cpu_flags_and_threads():
    ident = device_identity("cpu")
    kind, model, flags, threads = ident.split("|")
    assert kind == "cpu" and model
    assert set(filter(None, flags.split(","))) <= set(cache_mod._ISA_FLAGS)
    assert threads == f"threads={torch.get_num_threads()}"
    with pytest.raises(ValueError, match="unsupported device"):
        device_identity("mps")


def test_threads_and_env_change_the_digest(monkeypatch):
    monkeypatch.delenv("FXFORGE_CPU_ISA", raising=False)
    base = CacheKey.make("matmul", "abc", {"M": 64})
    assert CacheKey.make("matmul", "abc", {"M": 64}) == base
    monkeypatch.setenv("FXFORGE_CPU_ISA", "scalar")
    assert CacheKey.make("matmul", "abc", {"M": 64}).digest() != base.digest()
    monkeypatch.delenv("FXFORGE_CPU_ISA")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert CacheKey.make("matmul", "abc", {"M": 64}).digest() != base.digest()
    finally:
        torch.set_num_threads(threads)


def test_key_is_hashable_and_copies_its_dicts():
    problem = {"M": 128}
    key = make_key(problem=problem)
    problem["M"] = 256  # the caller's dict changing later must not move the key
    assert key.problem == {"M": 128}
    assert len({key, make_key(problem={"M": 128})}) == 1
    assert CacheKey.from_fields(key.fields()) == key
    with pytest.raises(ValueError, match="schema"):
        CacheKey.from_fields({**key.fields(), "schema": 99})
    with pytest.raises(TypeError, match="JSON-able"):
        make_key(problem={"M": object()})
    with pytest.raises(TypeError, match="source_hash, problem"):
        make_key(source_hash=None, problem=[128])


def test_kernel_names_stay_inside_the_root(cache):
    path = cache.path_for(make_key(kernel="../../etc/passwd"))
    assert path.parent.parent == cache.root and path.suffix == ".json"


# --- round trip ---------------------------------------------------------------------------------

def test_round_trip_survives_a_new_instance(cache):
    key = make_key()
    assert cache.get(key) is None
    path = cache.put(key, make_record(64))
    assert path == cache.path_for(key) and path.is_file()
    assert cache.get(key) == make_record(64)
    fresh = TuningCache(cache.root)  # what a new process sees
    assert fresh.get(key) == make_record(64)
    assert fresh.entries() == [(key.fields(), make_record(64))]
    cache.put(key, make_record(128))  # last writer wins
    assert fresh.get(key) == make_record(128)
    fresh.clear()
    assert cache.get(key) is None and cache.entries() == []


def test_put_rejects_an_invalid_record(cache):
    with pytest.raises(ValueError, match="record"):
        cache.put(make_key(), {"best_time": 1.0})
    with pytest.raises(ValueError, match="str -> int"):
        cache.put(make_key(), {"config": {"params": {"BLOCK": True}, "num_warps": 4,
                                          "num_stages": 2}})


def test_config_json_round_trip():
    config = Config.of(num_warps=8, num_stages=3, BLOCK_M=64, GROUP_M=8)
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
    with pytest.raises(ValueError, match="num_warps"):
        config_from_json({"params": {"BLOCK_M": 64}, "num_stages": 2})
    with pytest.raises(ValueError, match="params"):
        config_from_json(["BLOCK_M", 64])


# --- invalidation -------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("torch", "2.14.0"), ("fxforge", "0.2.0"),
                                         ("triton", None)])
def test_version_change_misses(cache, caplog, field, value):
    key = make_key()
    cache.put(key, make_record())
    upgraded = make_key(versions={**VERSIONS, field: value})
    assert upgraded.digest() != key.digest()
    assert cache.get(upgraded) is None
    assert cache.get(key) == make_record()
    assert not caplog.records  # a plain miss is not worth a warning


@pytest.mark.parametrize("change", [{"source_hash": "def456"}, {"device": "cpu|Other|avx|t=2"},
                                    {"env": {"OMP_NUM_THREADS": "2"}}, {"schema": 2}])
def test_file_with_a_different_key_at_the_same_path_is_rejected(cache, caplog, change):
    stored, wanted = make_key(), make_key(**change)
    cache.put(stored, make_record())
    path = cache.path_for(wanted)
    path.write_bytes(cache.path_for(stored).read_bytes())  # e.g. a copied or stale file
    for _ in range(3):
        assert cache.get(wanted) is None
    assert len(warnings_about(caplog, path)) == 1


# --- corruption ---------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff\xfe garbage \x89PNG" * 10)


def _empty(path: Path) -> None:  # what a power loss before the data hit the disk can leave
    path.write_bytes(b"")


def _wrong_checksum(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["record"]["config"]["params"]["BLOCK_M"] = 16  # a silently wrong config
    path.write_text(json.dumps(doc))


def _not_a_dict(path: Path) -> None:
    path.write_text("[1, 2, 3]")


def _bad_record_behind_good_checksum(path: Path) -> None:
    doc = json.loads(path.read_text())
    record = {"config": {"params": {"BLOCK_M": "64"}, "num_warps": 4, "num_stages": 2}}
    doc["record"], doc["checksum"] = record, cache_format.checksum(doc["key"], record)
    path.write_text(json.dumps(doc))


def _missing_fields(path: Path) -> None:
    doc = json.loads(path.read_text())
    del doc["key"]["versions"]
    doc["checksum"] = cache_format.checksum(doc["key"], doc["record"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _empty, _wrong_checksum, _not_a_dict,
                                     _bad_record_behind_good_checksum, _missing_fields])
def test_corrupt_entry_is_reported_once_ignored_and_repaired(cache, caplog, corrupt):
    key = make_key()
    path = cache.put(key, make_record(64))
    corrupt(path)
    for _ in range(3):
        assert cache.get(key) is None
    assert TuningCache(cache.root).entries() == []
    messages = warnings_about(caplog, path)
    assert len(messages) == 1 and "ignored" in messages[0]
    assert cache.put(key, make_record(32)) == path
    assert cache.get(key) == make_record(32)


def test_unreadable_entry_is_a_reported_miss(cache, caplog):
    key = make_key()
    path = cache.path_for(key)
    path.mkdir(parents=True)  # reading a folder fails with an OSError other than "not found"
    assert cache.get(key) is None and cache.get(key) is None
    assert len(warnings_about(caplog, path)) == 1


# --- unwritable cache ---------------------------------------------------------------------------

def test_failed_write_warns_once_and_leaves_no_temp_file(cache, caplog, monkeypatch):
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    assert cache.put(make_key(), make_record()) is None
    assert cache.put(make_key(kernel="conv"), make_record()) is None
    assert len(warnings_about(caplog, cache.root)) == 1
    assert [p for p in cache.root.rglob("*") if p.is_file()] == []
    assert cache.get(make_key()) is None


def test_root_that_is_a_file_warns_and_carries_on(cache, caplog):
    cache.root.parent.mkdir(parents=True, exist_ok=True)
    cache.root.write_text("not a folder")
    assert cache.put(make_key(), make_record()) is None
    assert cache.get(make_key()) is None and cache.entries() == []
    assert len(warnings_about(caplog, cache.root)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions (see the two tests above)")
def test_read_only_root_warns_and_carries_on(cache, caplog):
    cache.root.mkdir(parents=True)
    cache.root.chmod(0o500)
    try:
        assert cache.put(make_key(), make_record()) is None
        assert cache.get(make_key()) is None
        assert len(warnings_about(caplog, cache.root)) == 1
    finally:
        cache.root.chmod(0o700)


# --- export / import / overlay ------------------------------------------------------------------

@pytest.fixture
def three_keys(cache) -> list[CacheKey]:
    keys = [make_key(problem={"M": m}) for m in (16, 32, 64)]
    for block, key in zip((16, 32, 64), keys):
        cache.put(key, make_record(block))
    cache.put(make_key(problem={"M": 999}), make_record(8))  # not exported
    return keys


def test_export_then_import_into_another_root(cache, three_keys, tmp_path):
    bundle = tmp_path / "artifact" / "tuning.json"
    assert cache.export(bundle, keys=three_keys + [make_key(problem={"M": 1})]) == 3
    other = TuningCache(tmp_path / "other")
    assert other.import_(bundle) == 3
    for block, key in zip((16, 32, 64), three_keys):
        assert other.get(key) == make_record(block)
    assert other.get(make_key(problem={"M": 999})) is None
    assert cache.export(tmp_path / "all.json") == 4


def test_import_without_overwrite_keeps_local_entries(cache, three_keys, tmp_path):
    bundle = tmp_path / "tuning.json"
    cache.export(bundle, keys=three_keys)
    other = TuningCache(tmp_path / "other")
    other.put(three_keys[0], make_record(128))
    assert other.import_(bundle, overwrite=False) == 2
    assert other.get(three_keys[0]) == make_record(128)
    assert other.import_(bundle) == 3
    assert other.get(three_keys[0]) == make_record(16)


def test_import_skips_a_corrupted_entry_with_one_warning(cache, three_keys, tmp_path, caplog):
    bundle = tmp_path / "tuning.json"
    cache.export(bundle, keys=three_keys)
    doc = json.loads(bundle.read_text())
    doc["entries"][1]["record"]["config"]["num_warps"] = 8  # checksum no longer matches
    doc["entries"].append({"key": "junk"})
    bundle.write_text(json.dumps(doc))
    other = TuningCache(tmp_path / "other")
    assert other.import_(bundle) == 2
    assert other.get(three_keys[1]) is None and other.get(three_keys[2]) == make_record(64)
    messages = warnings_about(caplog, bundle)
    assert len(messages) == 1 and "skipped 2 invalid entries" in messages[0]


@pytest.mark.parametrize("content", [b"\x00\x01garbage", b'{"format": "other", "entries": []}',
                                     b'{"format": "fxforge-tuning", "schema": 1, "entries": 3}',
                                     b'{"format": "fxforge-tuning", "schema": 9, "entries": []}',
                                     None])
def test_bad_bundle_imports_nothing(tmp_path, caplog, content):
    bundle = tmp_path / "tuning.json"
    if content is not None:
        bundle.write_bytes(content)
    target = TuningCache(tmp_path / "other")
    assert target.import_(bundle) == 0
    assert target.add_overlay(bundle) == 0
    assert warnings_about(caplog, bundle)
    assert not target.root.exists()


def test_overlay_serves_a_bundle_without_writing(cache, three_keys, tmp_path):
    bundle = tmp_path / "tuning.json"
    cache.export(bundle, keys=three_keys)
    local = TuningCache(tmp_path / "user")
    local.put(three_keys[0], make_record(128))  # the artifact's entry wins over the disk
    assert local.add_overlay(bundle) == 3
    assert local.get(three_keys[0]) == make_record(16)
    assert local.get(three_keys[2]) == make_record(64)
    local.get(three_keys[2])["config"]["num_warps"] = 1  # callers get copies
    assert local.get(three_keys[2]) == make_record(64)
    assert [p.name for p in local.root.rglob("*.json")] == [local.path_for(three_keys[0]).name]
    assert len(local.entries()) == 1

    in_memory = TuningCache.with_overlay([(three_keys[1].fields(), make_record(32))],
                                         root=tmp_path / "nowhere")
    assert in_memory.get(three_keys[1]) == make_record(32)
    assert in_memory.get(three_keys[0]) is None
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ValueError, match="add_overlay"):
        in_memory.add_overlay([(three_keys[0].fields(), {"no": "config"})])
