"""Fixtures the pass tests share."""
import pytest


@pytest.fixture
def fresh_measurements():
    """The measured attention modes remember a model's first measurement for the process; a
    test using this measures anew (some fix the measurement)."""
    from fxforge.passes import attention_calib
    attention_calib._REMEMBERED.clear()
    yield
    attention_calib._REMEMBERED.clear()
