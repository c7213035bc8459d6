"""How the cache's paths are walked: the root is resolved once, the same way for the kernel and
the tuning cache, and a link on the way to it must be one no one else can re-point; an entry is
checked before it is read, on the descriptor it is read from; a listing checks each folder once.
"""
from __future__ import annotations

import os
import pwd
import threading

import pytest

from fxforge.autotune.cache import CacheKey, TuningCache
from fxforge.kernels import cache_trust

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
RECORD = {"config": {"params": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2}}


def key(m: int = 8) -> CacheKey:
    return CacheKey("probe", "h", {"M": m}, "cpu|test|avx2|threads=1",
                    {"fxforge": "0", "torch": "0", "triton": None}, {})



pytestmark = pytest.mark.usefixtures("fresh_trust_state")



# --- a link on the way to the cache -------------------------------------------------------------

def linked_cache(tmp_path, monkeypatch, how: str):
    """FXFORGE_CACHE_DIR is a link to a folder of ours holding a valid tuning entry; returns
    (the link, the real folder)."""
    real = tmp_path / "real"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(real))
    assert TuningCache().put(key(), RECORD) is not None
    holder = tmp_path / "holder"
    holder.mkdir(mode=0o700)
    if how == "in a folder others can write":
        holder.chmod(0o777)   # no sticky bit: anyone may replace the link
    link = holder / "cache"
    link.symlink_to(real)
    if how == "owned by another user":
        os.lchown(link, pwd.getpwnam("nobody").pw_uid, -1)
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(link))
    return link, real


@pytest.mark.parametrize("how", ["in a folder others can write", "owned by another user"])
def test_a_link_to_the_cache_that_others_can_re_point_is_refused(tmp_path, monkeypatch, trust_warnings,
                                                                 how):
    if how == "owned by another user" and not IS_ROOT:
        pytest.skip("needs root to give a link to another user (os.lchown)")
    link, real = linked_cache(tmp_path, monkeypatch, how)
    assert TuningCache().get(key()) is None
    assert TuningCache().put(key(16), RECORD) is None
    kernels = cache_trust.trusted_dir("kernels")
    assert not kernels.is_relative_to(real) and not (real / "kernels").exists()
    messages = trust_warnings()
    assert messages and all(str(link) in m for m in messages)


def test_a_link_to_the_cache_in_a_folder_of_ours_is_followed_once(tmp_path, monkeypatch, trust_warnings):
    link, real = linked_cache(tmp_path, monkeypatch, "in a folder of ours")
    cache = TuningCache()
    assert cache.root == real / "autotune" and cache.get(key()) == RECORD
    assert cache_trust.trusted_dir("kernels") == real / "kernels"
    link.unlink()
    link.symlink_to(tmp_path)   # re-pointed later: what was resolved is what is used
    assert cache.get(key()) == RECORD
    assert trust_warnings() == []


# --- an entry is checked before it is read ------------------------------------------------------

@pytest.mark.parametrize("how", ["a FIFO in a folder others can write", "a link to a FIFO"])
def test_a_tuning_entry_is_checked_before_it_is_opened(root, tmp_path, trust_warnings, how):
    """Reading first would block on a FIFO planted under the entry's name (a reader waits for
    a writer), and follow a link to wherever it points."""
    entry = TuningCache().put(key(), RECORD)
    entry.unlink()
    fifo = entry if how.startswith("a FIFO in") else tmp_path / "fifo"
    os.mkfifo(fifo)
    if how.startswith("a FIFO in"):
        entry.parent.chmod(0o777)
    else:
        entry.symlink_to(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(TuningCache().get(key())), daemon=True)
    reader.start()
    reader.join(timeout=120)   # bounds only the failure: a correct get() never waits
    if reader.is_alive():      # blocked in open(): give it a writer so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
        pytest.fail("the tuning cache opened a FIFO before checking the entry")
    assert got == [None]
    assert len(trust_warnings()) == 1


def test_listing_checks_each_folder_chain_once_not_once_per_entry(tmp_path, monkeypatch):
    def stat_calls_to_list(entries: int) -> int:
        cache = TuningCache(tmp_path / f"tuning{entries:03d}")
        for m in range(entries):
            cache.put(key(m), RECORD)
        calls = []
        counted = {name: getattr(os, name) for name in ("stat", "lstat")}
        for name, call in counted.items():
            monkeypatch.setattr(os, name, lambda *a, _call=call, **k: calls.append(a) or
                                _call(*a, **k))
        try:
            assert len(cache.entries()) == entries
        finally:
            for name, call in counted.items():
                monkeypatch.setattr(os, name, call)
        return len(calls)

    assert stat_calls_to_list(24) == stat_calls_to_list(2)
