"""Reading names, dtypes, devices and symbolic sizes from stored text without evaluating it.

What an artifact (or the command line) says is data. Each reader here builds its value from a
fixed vocabulary: dtypes and devices from tables, names only as Python identifiers (fx writes
node names into generated source), and symbolic sizes through a grammar of their own — integers,
symbols, ``+ - *``, ``//``, ``**`` with a small literal exponent, parentheses and the integer
functions ``str()`` of a shape-environment expression prints (``Max``, ``Min``, ``Mod``,
``FloorDiv`` ...). Nothing goes through ``sympify``, ``eval`` or an import, and the length and
nesting of an expression are bounded, so hostile text costs at most a ``ParseError``.
"""
from __future__ import annotations

import keyword
import re
from typing import Callable, Union

import sympy
import torch
import torch.utils._sympy.functions as symfn

MAX_SIZE_CHARS = 512      # real sizes are a few dozen characters ("128*s70", "Min(64, 64*s70)")
MAX_DEPTH = 24            # nested parentheses, calls and unary minus
MAX_EXPONENT = 8          # "s70**2" occurs (square attention masks); nothing near 8 does
MAX_MAGNITUDE = 2 ** 62   # no size, stride or constant in a size comes close


def torch_name(value: object) -> str:
    """The stored name of a dtype, layout or memory format: ``torch.float32`` -> ``float32``."""
    return str(value).removeprefix("torch.")


# The dtypes an fxforge IR, artifact or input spec may name.
DTYPES = {torch_name(d): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}

_DEVICE = re.compile(r"^(cpu|meta|cuda)(:\d{1,3})?$")
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|[-+*(),]))")

# The integer-valued functions of torch's shape environment, by printed name, with arity.
_FUNCTIONS: dict[str, tuple[Callable, int]] = {
    "Max": (symfn.Max, -2), "Min": (symfn.Min, -2),      # -2: two or more arguments
    "Mod": (symfn.Mod, 2), "PythonMod": (symfn.PythonMod, 2), "FloorDiv": (symfn.FloorDiv, 2),
    "CeilDiv": (symfn.CeilDiv, 2), "CleanDiv": (symfn.CleanDiv, 2),
    "ModularIndexing": (symfn.ModularIndexing, 3), "IntTrueDiv": (symfn.IntTrueDiv, 2),
    "CeilToInt": (symfn.CeilToInt, 1), "FloorToInt": (symfn.FloorToInt, 1),
    "TruncToInt": (symfn.TruncToInt, 1),
}

Size = Union[int, sympy.Expr]


class ParseError(ValueError):
    """Stored text that is not a dtype, device, name or size fxforge reads."""


def parse_dtype(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ParseError(f"unsupported dtype {short_repr(name)} "
                         f"(fxforge reads {', '.join(DTYPES)})")
    return DTYPES[name]


def parse_device(text: object) -> torch.device:
    if not isinstance(text, str) or not _DEVICE.match(text):
        raise ParseError(f"unsupported device {short_repr(text)} "
                         "(expected cpu, meta, cuda or cuda:N)")
    return torch.device(text)


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it is a plain Python identifier (fx writes such names into Python source)."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) \
            or name.startswith("__") or len(name) > 200:
        raise ParseError(f"bad {what} {short_repr(name)}: expected a Python identifier")
    return name


def shape_symbol(name: str) -> sympy.Symbol:
    """A symbol with the shape environment's assumptions: ``s0`` sizes are positive integers."""
    if name.startswith("s"):
        return sympy.Symbol(name, integer=True, positive=True)
    return sympy.Symbol(name, integer=True)


def parse_size(text: object, symbol: Callable[[str], sympy.Symbol] = shape_symbol) -> Size:
    """An int, or the sympy expression ``text`` spells (see the module docstring's grammar)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ParseError(f"a size must be a string or an integer, got {type(text).__name__}")
    if isinstance(text, int):
        return int(_bounded(sympy.Integer(text), text))
    if len(text) > MAX_SIZE_CHARS:
        raise ParseError(f"size expression of {len(text)} characters (at most {MAX_SIZE_CHARS})")
    try:
        value = _SizeParser(text, symbol).parse()
    except (ArithmeticError, TypeError, ValueError, RecursionError) as exc:
        if isinstance(exc, ParseError):
            raise
        raise ParseError(f"bad size {short_repr(text)}: {type(exc).__name__}: {exc}") from None
    return int(value) if value.is_Integer else value


def short_repr(value: object) -> str:
    """A short repr for messages (what is shown may be an attacker's megabyte)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bounded(value: sympy.Expr, text: object) -> sympy.Expr:
    if value.is_Integer and abs(int(value)) > MAX_MAGNITUDE:
        raise ParseError(f"size {short_repr(text)}: {short_repr(value)} is out of range")
    return value


class _SizeParser:
    """Recursive descent over the tokens of one size expression; builds sympy objects directly."""

    def __init__(self, text: str, symbol: Callable[[str], sympy.Symbol]):
        self.text, self.symbol, self.depth = text, symbol, 0
        self.tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            if not match:
                raise ParseError(f"bad size {short_repr(text)}: unexpected "
                                 f"{text[position:].strip()[:20]!r}")
            number, name, symbol_text = match.groups()
            kind = "int" if number is not None else "name" if name is not None else symbol_text
            self.tokens.append((kind, match.group().strip()))
            position = match.end()
        self.tokens.append(("end", ""))
        self.at = 0

    def parse(self) -> sympy.Expr:
        value = self.expr()
        if self.peek() != "end":
            self.fail(f"unexpected {self.tokens[self.at][1]!r}")
        return value

    def peek(self) -> str:
        return self.tokens[self.at][0]

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            self.fail(f"expected {kind!r}, found {self.tokens[self.at][1] or 'the end'!r}")
        self.at += 1
        return self.tokens[self.at - 1][1]

    def fail(self, why: str):
        raise ParseError(f"bad size {short_repr(self.text)}: {why}")

    def nested(self, parse: Callable[[], sympy.Expr]) -> sympy.Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH}")
        try:
            return parse()
        finally:
            self.depth -= 1

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take(self.peek())
            right = self.term()
            value = _bounded(value + right if op == "+" else value - right, self.text)
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while self.peek() in ("*", "//"):
            op = self.take(self.peek())
            right = self.unary()
            value = value * right if op == "*" else symfn.FloorDiv(value, right)
            value = _bounded(value, self.text)
        return value

    def unary(self) -> sympy.Expr:
        if self.peek() == "-":
            self.take("-")
            return -self.nested(self.unary)
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take("**")
        exponent = int(self.take("int"))
        if exponent > MAX_EXPONENT or base.has(sympy.Pow):
            self.fail(f"power {exponent} of {base} (at most one power of at most {MAX_EXPONENT})")
        return _bounded(base ** exponent, self.text)

    def atom(self) -> sympy.Expr:
        kind = self.peek()
        if kind == "int":
            return _bounded(sympy.Integer(int(self.take("int"))), self.text)
        if kind == "(":
            self.take("(")
            value = self.nested(self.expr)
            self.take(")")
            return value
        name = self.take("name")
        if self.peek() != "(":
            return self.symbol(name)
        if name not in _FUNCTIONS:
            self.fail(f"unknown function {name!r}")
        return self.nested(lambda: self.call(name))

    def call(self, name: str) -> sympy.Expr:
        function, arity = _FUNCTIONS[name]
        self.take("(")
        args = [self.expr()]
        while self.peek() == ",":
            self.take(",")
            args.append(self.expr())
        self.take(")")
        if (arity > 0 and len(args) != arity) or (arity < 0 and len(args) < -arity):
            self.fail(f"{name} takes {abs(arity)}{'+' if arity < 0 else ''} arguments, "
                      f"got {len(args)}")
        return _bounded(function(*args), self.text)
