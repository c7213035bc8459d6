"""The table of ``options={"attention": ...}`` modes: each mode's name, what it does, and the
parser of its fields (in its own module); :func:`parse_attention` reads an option through it."""
from __future__ import annotations

from typing import Any, Callable

from fxforge.passes.attention_linear import parse_linear
from fxforge.passes.attention_per_head import parse_per_head
from fxforge.passes.attention_sparse import parse_block_sparse
from fxforge.passes.attention_spec import AttentionSpecError, split_spec
from fxforge.passes.attention_window import parse_window
from fxforge.passes.base import Pass

# mode -> (what it does, parser(spec, value, fields) -> a spec with make_pass() and a str)
MODES: dict[str, tuple[str, Callable[[str, str, dict], Any]]] = {
    "sliding_window": ("StreamingLLM: the first S positions plus a window of the last W",
                       parse_window),
    "block_sparse": ("block-sparse prefill: local, global and strided key blocks, or a pattern "
                     "per head measured on calibration text (auto)", parse_block_sparse),
    "per_head": ("DuoAttention-style: k/v heads that keep their attention in sinks plus a "
                 "window (measured on calibration text) stream, the rest stay full",
                 parse_per_head),
    "linear": ("feature-map linear attention (elu or a fitted map), optionally a softmax window",
               parse_linear),
}


def parse_attention(spec: str) -> Any:
    """The spec of one ``attention`` option (its ``str`` is the canonical option)."""
    mode, value, fields = split_spec(spec)
    if mode not in MODES:
        raise AttentionSpecError(f"option attention={spec!r}: unknown mode {mode!r}; the modes "
                                 f"are {', '.join(MODES)}")
    return MODES[mode][1](spec, value, fields)


def attention_pass(spec: str) -> Pass:
    """The pass for one ``attention`` option."""
    return parse_attention(spec).make_pass()
