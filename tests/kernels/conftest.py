"""Fixtures the cache-trust tests share (``test_cache_trust*.py``)."""
from __future__ import annotations

import logging

import pytest

from fxforge.kernels import cache_trust


@pytest.fixture
def fresh_trust_state():
    """No warning given, fallback folder made or library loaded by an earlier test counts."""
    cache_trust.reset()
    yield
    cache_trust.reset()


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A cache root of the test's own (not yet created), set as ``FXFORGE_CACHE_DIR``."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def trust_warnings(caplog):
    """A function giving the fxforge warnings logged so far, as messages."""
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name.startswith("fxforge") and r.levelno >= logging.WARNING]
