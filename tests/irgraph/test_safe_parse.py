"""Sizes, dtypes, devices and names read from stored text: built from a grammar, never evaluated."""
import pytest
import sympy
import torch
import torch.utils._sympy.functions as F

from fxforge.irgraph.safe_parse import (MAX_SIZE_CHARS, ParseError, check_name, parse_device,
                                        parse_dtype, parse_size, shape_symbol)

s0, s1 = shape_symbol("s0"), shape_symbol("s1")


@pytest.mark.parametrize("expr", [
    s0, 2 * s0 - 1, 3 - s0, s0 * s1, s0 ** 2, (s0 + 1) * (s1 - 2), F.FloorDiv(s0, 2),
    F.FloorDiv(s0 + s1, 4), s1 * F.FloorDiv(s0, 2), F.Mod(s0, 4), F.PythonMod(s0, s1),
    F.Max(s0, s1, 3), F.Min(64, 64 * s0), F.CeilDiv(s0, 2), F.ModularIndexing(s0, 2, 4),
    F.CeilToInt(F.IntTrueDiv(s0, 2)), -s0, 128 * s0 + 64 * s1 * s0,
])
def test_what_the_shape_environment_prints_reads_back_as_the_same_expression(expr):
    assert parse_size(str(expr)) == expr


def test_integers_and_user_symbols():
    assert parse_size("16") == 16 and parse_size(7) == 7 and parse_size(" -3 ") == -3
    seq = parse_size("seq + 1", symbol=sympy.Symbol)
    assert seq == sympy.Symbol("seq") + 1


@pytest.mark.parametrize("text", [
    "__import__('os').system('id') + s0", "(lambda: 1)()", "s0.__class__", "s0; s1", "s0 if 1 else 2",
    "exec('1')", "eval('1')", "Symbol('x')", "s0 / 2", "1.5", "1e3", "s0 ** s1", "s0 ** 100",
    "(s0 ** 8) ** 8", "2 ** 62 * 2 ** 62", str(10 ** 30), "s0 +", "()", "Max(s0)", "Mod(s0)",
    "FloorDiv(s0, 0)", "s0[0]", "'s0'", "s0 @ s1", "Max(s0, s1,)", "",
])
def test_anything_else_is_refused(text):
    with pytest.raises(ParseError):
        parse_size(text)


def test_hostile_lengths_and_depths_are_refused_at_once():
    for text in ("+".join(["s0"] * 200_000), "(" * 100_000 + "s0" + ")" * 100_000,
                 "-" * 400 + "s0", "(" * 30 + "s0" + ")" * 30):
        with pytest.raises(ParseError, match="characters|nested"):
            parse_size(text)
    assert len("+".join(["s0"] * 100)) < MAX_SIZE_CHARS
    assert parse_size("+".join(["s0"] * 100)) == 100 * s0


def test_dtypes_devices_and_names_come_from_tables():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_device("cuda:1") == torch.device("cuda:1")
    for bad in ("__class__", "int3", "Tensor", "float8_e4m3fn", "uint64", 1, None):
        with pytest.raises(ParseError, match="dtype"):
            parse_dtype(bad)
    for bad in ("cpu'); import os; ('", "cuda:x", "mps", "privateuseone", "", None):
        with pytest.raises(ParseError, match="device"):
            parse_device(bad)
    assert check_name("p_lin_weight") == "p_lin_weight"
    for bad in ("x=open('m')", "a.b", "__class__", "class", "1x", 'w"), getattr(x, "y', "", 3):
        with pytest.raises(ParseError, match="identifier"):
            check_name(bad)
