"""What the C++ and the Triton renderers of a row program share: one table of op spellings,
a column per target, and :class:`RowExprs`, the expression renderer both specialise.

A row program's value (``kernels/fused.py``) is an op on registers of one kind: fp32 ('f'),
int64 ('i') or bool ('b'). ``RowExprs.op_expr`` converts the operands to the op's kind, spells
the op from the table, converts the result to its own kind and rounds it to its dtype; a target
supplies its literals, conversions and rounding. ``{0}``, ``{1}``, ``{2}`` are the operands.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from fxforge.kernels.row_program import RowProgram, Unsupported, kind_of

CPP, TRITON = 0, 1   # the columns of the tables below

#         op               C++                                   Triton
FLOAT_OPS = {
    "neg":          ("(-{0})",                             "(-{0})"),
    "abs":          ("fabsf({0})",                         "tl.abs({0})"),
    "exp":          ("fxf_exp({0})",                       "tl.exp({0})"),
    "log":          ("fxf_log({0})",                       "tl.log({0})"),
    "sqrt":         ("sqrtf({0})",                         "tl.sqrt_rn({0})"),
    "rsqrt":        ("(1.0f / sqrtf({0}))",                "(1.0 / tl.sqrt_rn({0}))"),
    "reciprocal":   ("(1.0f / {0})",                       "(1.0 / {0})"),
    "tanh":         ("fxf_tanh({0})",                      "_tanh({0})"),
    "sigmoid":      ("fxf_sigmoid({0})",                   "(1.0 / (1.0 + tl.exp(-{0})))"),
    "erf":          ("fxf_erf({0})",                       "_erf({0})"),
    "relu":         ("({0} < 0.0f ? 0.0f : {0})",          "tl.where({0} < 0.0, 0.0, {0})"),
    "silu":         ("({0} / (1.0f + fxf_exp(-{0})))",     "({0} / (1.0 + tl.exp(-{0})))"),
    "sin":          ("sinf({0})",                          "tl.sin({0})"),
    "cos":          ("cosf({0})",                          "tl.cos({0})"),
    "add":          ("({0} + {1})",                        "({0} + {1})"),
    "sub":          ("({0} - {1})",                        "({0} - {1})"),
    "mul":          ("({0} * {1})",                        "({0} * {1})"),
    "div":          ("({0} / {1})",                        "({0} / {1})"),
    # NaN propagates from either operand, as in eager
    "maximum":      ("(({0} != {0}) ? {0} : (({0} > {1}) ? {0} : {1}))",
                     "tl.where({0} != {0}, {0}, tl.where({0} > {1}, {0}, {1}))"),
    "minimum":      ("(({0} != {0}) ? {0} : (({0} < {1}) ? {0} : {1}))",
                     "tl.where({0} != {0}, {0}, tl.where({0} < {1}, {0}, {1}))"),
    "where":        ("({0} ? {1} : {2})",                  "tl.where({0}, {1}, {2})"),
    "cast":         ("{0}",                                "{0}"),
    # gelu(approximate="none") and gelu(approximate="tanh"); sqrt(2 / pi) = 0.79788...
    "gelu":         ("(0.5f * {0} * (1.0f + fxf_erf({0} * 0.70710678118654752440f)))",
                     "(0.5 * {0} * (1.0 + _erf({0} * 0.7071067811865476)))"),
    "gelu_tanh":    ("(0.5f * {0} * (1.0f + fxf_tanh(0.7978845608028654f * ({0} + 0.044715f * {0} * {0} * {0}))))",
                     "(0.5 * {0} * (1.0 + _tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0}))))"),
}
INT_OPS = {
    "neg":          ("(-{0})",                             "(-{0})"),
    "abs":          ("({0} < 0 ? -{0} : {0})",             "tl.abs({0})"),
    "relu":         ("({0} < 0 ? 0 : {0})",                "tl.where({0} < 0, 0, {0})"),
    "add":          ("({0} + {1})",                        "({0} + {1})"),
    "sub":          ("({0} - {1})",                        "({0} - {1})"),
    "mul":          ("({0} * {1})",                        "({0} * {1})"),
    "maximum":      ("({0} > {1} ? {0} : {1})",            "tl.maximum({0}, {1})"),
    "minimum":      ("({0} < {1} ? {0} : {1})",            "tl.minimum({0}, {1})"),
    "where":        ("({0} ? {1} : {2})",                  "tl.where({0}, {1}, {2})"),
    "cast":         ("{0}",                                "{0}"),
    "bitwise_not":  ("(~{0})",                             "(~{0})"),
}
BOOL_OPS = {   # Triton holds bools as int1: no `!`, `&&`, `||`
    "logical_not":  ("(!{0})",                             "({0} == 0)"),
    "bitwise_not":  ("(!{0})",                             "({0} == 0)"),
    "logical_and":  ("({0} && {1})",                       "({0} & {1})"),
    "where":        ("({0} ? {1} : {2})",                  "tl.where({0}, {1}, {2})"),
    "cast":         ("{0}",                                "{0}"),
    "maximum":      ("({0} || {1})",                       "({0} | {1})"),
    "minimum":      ("({0} && {1})",                       "({0} & {1})"),
    "mul":          ("({0} && {1})",                       "({0} & {1})"),
    "add":          ("({0} || {1})",                       "({0} | {1})"),
}
COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}   # both targets
POW_SPECIAL = {   # x ** e for exponents with an exact cheaper form (None: the general call)
    2.0:  ("({0} * {0})",                  "({0} * {0})"),
    1.0:  ("{0}",                          "{0}"),
    0.5:  ("sqrtf({0})",                   "tl.sqrt_rn({0})"),
    3.0:  ("({0} * {0} * {0})",            "({0} * {0} * {0})"),
    -1.0: ("(1.0f / {0})",                 "(1.0 / {0})"),
    -2.0: ("(1.0f / ({0} * {0}))",         "(1.0 / ({0} * {0}))"),
    -0.5: ("(1.0f / sqrtf({0}))",          "(1.0 / tl.sqrt_rn({0}))"),
    0.0:  ("1.0f",                         None),
}
_TABLES = {"f": FLOAT_OPS, "i": INT_OPS, "b": BOOL_OPS}


def spelled(table: Mapping[Any, tuple], column: int) -> dict:
    """One target's column of a table (entries it has no spelling for left out)."""
    return {key: row[column] for key, row in table.items() if row[column] is not None}


class RowExprs:
    """Expressions for the values of a row program; a target sets the class attributes and
    implements ``ref``, ``literal``, ``as_kind``, ``convert`` and ``round``."""

    target = ""            # for messages: "C++", "Triton"
    column = CPP
    pow_call = ""          # x ** e without a special form: "{0}" is x, "{e}" the exponent
    select_col = ""        # a cat over the last dim: "{0}" below column "{at}", "{1}" above

    def __init__(self, program: RowProgram):
        self.values = program.values
        self.ops = {kind: spelled(table, self.column) for kind, table in _TABLES.items()}
        self.pow_special = spelled(POW_SPECIAL, self.column)

    def ref(self, vid: int) -> str:
        raise NotImplementedError

    def literal(self, x: Any, kind: str) -> str:
        raise NotImplementedError

    def as_kind(self, vid: int, kind: str) -> str:
        raise NotImplementedError

    def convert(self, expr: str, op: str, source: str, result: str) -> str:
        """``expr``, the result of ``op`` computed in kind ``source``, as kind ``result``."""
        raise NotImplementedError

    def round(self, dtype: torch.dtype, expr: str) -> str:
        raise NotImplementedError

    def op_expr(self, vid: int) -> str:
        value = self.values[vid]
        kinds = ["b" if value.op == "where" and k == 0 else value.ctype
                 for k in range(len(value.args))]
        args = [self.as_kind(a, k) for a, k in zip(value.args, kinds)]
        expr = self.spell(value, args)
        result = kind_of(value.dtype)
        if result != value.ctype:   # e.g. a cast: the op ran in the source kind
            expr = self.convert(expr, value.op, value.ctype, result)
        return self.round(value.dtype, expr)

    def spell(self, value, args: list[str]) -> str:
        if value.op in COMPARE:
            return f"({args[0]} {COMPARE[value.op]} {args[1]})"
        if value.op == "pow":
            general = self.pow_call.replace("{e}", self.literal(value.attr, "f"))
            return self.pow_special.get(value.attr, general).format(*args)
        if value.op == "clamp":
            return self.clamp(args[0], value.attr, value.ctype)
        if value.op == "select_col":
            return self.select_col.replace("{at}", self.literal(value.attr, "i")).format(*args)
        op = "gelu_tanh" if value.op == "gelu" and value.attr == "tanh" else value.op
        table = self.ops[value.ctype]
        if op not in table:
            raise Unsupported(f"{value.op} on {value.dtype} in {self.target}")
        return table[op].format(*args)

    def clamp(self, x: str, bounds: tuple, kind: str) -> str:
        where = self.ops["f"]["where"]
        lo, hi = bounds
        if lo is not None:
            x = where.format(f"{x} < {self.literal(lo, kind)}", self.literal(lo, kind), x)
        if hi is not None:
            x = where.format(f"{x} > {self.literal(hi, kind)}", self.literal(hi, kind), x)
        return x

