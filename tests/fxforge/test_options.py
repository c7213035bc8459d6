"""Compile options: every bad value is one OptionsError naming its option. A valid option set is
hashable: ``backend_for`` keeps one backend per option set."""
import pytest
import torch

import fxforge
from fxforge.options import parse_options


@pytest.mark.parametrize("key, value", [
    ("quantize", []), ("prune", {}), ("attention", []), ("quantize", 0), ("prune", False),
    ("passes", 5), ("passes", "dce"), ("passes", [["dce"]]), ("passes", {"dce": 1}),
])
def test_bad_option_values_are_options_errors(key, value):
    with pytest.raises(fxforge.OptionsError, match=key):
        parse_options({key: value})
    with pytest.raises(fxforge.OptionsError, match=key):
        fxforge.compile(torch.nn.Linear(2, 2), **{key: value})


def test_valid_options_are_hashable():
    options = parse_options(passes=["dce"], quantize=None, autotune=True, max_sessions=2)
    assert hash(options) == hash(parse_options(options.to_dict()))
