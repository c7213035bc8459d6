"""An op sweep: PyTorch's OpInfo database through ``torch.compile(backend="fxforge")``.

Every deterministic op of ``op_db`` with fp32 CPU support is wrapped as
``lambda *tensors: op(...)`` (its non-tensor arguments closed over), compiled under
``torch.no_grad()`` and run on one sample (the first non-empty one that runs eagerly).
Each op must either

* match eager within fp32 tolerance (NaN == NaN), fxforge having compiled the graph; or
* fall back with a logged reason: a WARNING from the fxforge loggers saying what
  "runs eagerly", or dynamo's own graph break (``counters["graph_break"]``).

Beyond values, the compiled call must leave the inputs as eager leaves them, must not
return memory shared with an input where eager returns a fresh tensor, and two calls must
not return the same memory. A crash that escapes the fallback, a mismatch, or an op that ran
eagerly with no reason given is a failure naming the op; ops that hit a known fxforge bug
are strict xfails (``XFAIL``, each with its repro).

The ops run in shards (one test each, so that ``-n 2`` spreads them); each shard prints its
counts, and the last one the totals when every shard ran in one process. Random ops and ops
whose eager output is uninitialised memory are skipped; ``test_sweep_selection`` prints them.
Dynamo's caches are reset around every op (compiles of one closure code object would
otherwise pile up against its recompile limit).
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

pytest.importorskip("expecttest")  # common_methods_invocations needs it

import fxforge  # noqa: F401,E402  (registers the backend)
import fxforge.compiler  # noqa: E402
from fxforge.testing import assert_close_to_eager  # noqa: E402

DTYPE = torch.float32
SHARDS = 8
MAX_NUMEL = 4096       # per sample tensor: keep samples small
SAMPLES_TRIED = 6      # look at the first few samples for one that runs eagerly
MIN_OPS = 150
# Matched (compiled by fxforge, equal to eager) over tried, per shard. Measured 0.91-0.96 per
# shard (~95% overall; the rest are dynamo graph breaks and ops fxforge runs eagerly).
MIN_MATCH_FRACTION = 0.88

# ---------------------------------------------------------------------------------------
# What is not swept, and why.

_RANDOM = ("random op: compiled and eager draw different numbers")
_UNINIT = ("output is uninitialised memory")
SKIPPED: dict[str, str] = {
    **{name: _RANDOM for name in (
        "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial",
        "normal", "normal.in_place", "normal.number_mean", "rand_like", "randint", "randint_like",
        "randn", "randn_like", "uniform", "nn.functional.alpha_dropout", "nn.functional.dropout",
        "nn.functional.dropout2d", "nn.functional.dropout3d",
        "nn.functional.feature_alpha_dropout.with_train",
        "nn.functional.feature_alpha_dropout.without_train", "nn.functional.rrelu")},
    **{name: _UNINIT for name in (
        "empty", "empty_like", "empty_permuted", "empty_strided", "new_empty",
        "new_empty_strided", "resize_", "resize_as_")},
}
# Substrings that mark an op random/uninitialised even if the table above misses it
# (new op_db entries). Checked against whole name parts, so "normalize" is kept.
_RANDOM_WORDS = ("rand", "randn", "randint", "bernoulli", "dropout", "multinomial", "uniform",
                 "cauchy", "geometric", "log_normal", "empty")

# Exact ops that expose a known fxforge bug: op key -> reason naming the bug, with a minimal
# repro. They run as strict xfails (a fix turns them into XPASS failures: then delete the
# entry). Empty at fxforge 61ae0d6: the output-aliasing bugs this sweep found (folded
# constants returned as outputs, clone(getitem(split_with_sizes)) dropped; arange, ones, full,
# new_zeros, split_with_sizes_copy...) are fixed there.
XFAIL: dict[str, str] = {}


def op_key(opinfo) -> str:
    return opinfo.name + (f".{opinfo.variant_test_name}" if opinfo.variant_test_name else "")


_DETERMINISTIC = {"native_dropout_backward"}  # takes the mask: no randomness


def skip_reason(key: str) -> Optional[str]:
    if key in SKIPPED:
        return SKIPPED[key]
    if key in _DETERMINISTIC:
        return None
    words = key.replace(".", "_").split("_")
    for word in _RANDOM_WORDS:
        if word in words or key.startswith(word):
            return "random or uninitialised (name)"
    return None


@lru_cache(maxsize=None)
def _op_db():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db
    return tuple(op_db)


@lru_cache(maxsize=None)
def selection() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(keys swept, (key, reason) skipped), for every op_db entry supporting fp32 on CPU."""
    swept, skipped = [], []
    for opinfo in _op_db():
        if DTYPE not in opinfo.supported_dtypes("cpu"):
            continue
        key = op_key(opinfo)
        reason = skip_reason(key)
        if reason:
            skipped.append((key, reason))
        else:
            swept.append(key)
    return tuple(swept), tuple(skipped)


def _opinfos() -> dict[str, Any]:
    return {op_key(o): o for o in _op_db()}


# ---------------------------------------------------------------------------------------
# One op: build the case, run eager and compiled, classify.

@dataclass
class Case:
    fn: Callable
    tensors: list[torch.Tensor]
    describe: str


def _tensor_leaf_ok(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and t.device.type == "cpu" and t.numel() <= MAX_NUMEL


def make_case(opinfo, sample) -> Optional[Case]:
    """``fn(*tensors)`` calls the op on the sample; non-tensor arguments are closed over.

    Factory ops (``ones``, ``arange``...) have no tensor argument: ``fn()`` then.
    """
    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in where]
    if not all(_tensor_leaf_ok(t) for t in tensors):
        return None
    op = opinfo.op

    def fn(*ts):
        filled = list(leaves)
        for i, t in zip(where, ts):
            filled[i] = t
        inp, args, kwargs = pytree.tree_unflatten(filled, spec)
        return op(inp, *args, **kwargs)

    shapes = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in tensors)
    return Case(fn, tensors, f"({shapes}) args={sample.args!r:.80} kwargs={sample.kwargs!r:.80}")


def _clone(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


@dataclass
class Eager:
    inputs: list[torch.Tensor]   # after the call (in-place ops change them)
    output: Any


def pick_case(opinfo) -> tuple[Optional[Case], Optional[Eager], str]:
    """The first (preferably non-empty) sample that runs eagerly, its eager result, or why none."""
    fallback: Optional[tuple[Case, Eager]] = None
    why = "no small fp32 CPU sample"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # sample_inputs_func, not sample_inputs: the latter's tracking wrapper walks the
        # (deep, under pytest) stack with inspect.stack() on every call, ~0.1 s per op.
        samples = opinfo.sample_inputs_func(opinfo, "cpu", DTYPE, False)
        for n, sample in enumerate(samples):
            if n >= SAMPLES_TRIED:
                break
            case = make_case(opinfo, sample)
            if case is None:
                continue
            inputs = _clone(case.tensors)
            try:
                with torch.no_grad():
                    output = case.fn(*inputs)
            except Exception as exc:  # op_db holds a few samples that error by design
                why = f"eager raised {type(exc).__name__}"
                continue
            if all(t.numel() > 0 for t in case.tensors):
                return case, Eager(inputs, output), ""
            fallback = fallback or (case, Eager(inputs, output))
    if fallback:
        return fallback[0], fallback[1], ""
    return None, None, why


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@dataclass
class Outcome:
    key: str
    status: str          # "matched", "fell_back", "skipped", "failed"
    detail: str = ""
    graphs: int = 0


def _first_line(text: str, limit: int = 160) -> str:
    return (text.strip().splitlines() or [""])[0][:limit]


def _storages(value: Any) -> list[Optional[int]]:
    out = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.numel() > 0:
            out.append(leaf.untyped_storage().data_ptr())
        else:
            out.append(None)
    return out


def _aliased_inputs(output: Any, inputs: list[torch.Tensor]) -> list[set[int]]:
    """Per output leaf, the indices of the inputs it shares memory with."""
    ins = [t.untyped_storage().data_ptr() if t.numel() > 0 else None for t in inputs]
    return [{i for i, p in enumerate(ins) if p is not None and p == s} if s is not None else set()
            for s in _storages(output)]


def check_aliasing(eager: Eager, inputs: list[torch.Tensor], first: Any, second: Any) -> None:
    """Compiled outputs alias the inputs eager's alias, and two calls never share an output."""
    want = _aliased_inputs(eager.output, eager.inputs)
    got = _aliased_inputs(first, inputs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g <= w, (f"output {i} shares memory with input(s) {sorted(g - w)}; eager's is a "
                        "fresh tensor")
    for i, (a, b, w) in enumerate(zip(_storages(first), _storages(second), want)):
        assert a is None or a != b or w, (f"output {i} is the same memory on two calls (mutating "
                                          "one result changes the next)")


def run_op(key: str, opinfo) -> Outcome:
    case, eager, why = pick_case(opinfo)
    if case is None:
        return Outcome(key, "skipped", why)
    torch._dynamo.reset()
    counters.clear()
    handler = _Records()
    logger = logging.getLogger("fxforge")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    graphs: list = []
    original = fxforge.compiler.compile_captured

    def recording(*args, **kwargs):
        graph = original(*args, **kwargs)
        graphs.append(graph)
        return graph

    fxforge.compiler.compile_captured = recording
    inputs = _clone(case.tensors)
    try:
        compiled = torch.compile(case.fn, backend="fxforge")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            actual = compiled(*inputs)
            again = compiled(*_clone(case.tensors))
    except Exception as exc:
        return Outcome(key, "failed", f"compiled call raised {type(exc).__name__}: "
                                      f"{_first_line(str(exc), 300)} on {case.describe}")
    finally:
        fxforge.compiler.compile_captured = original
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        torch._dynamo.reset()
    try:
        compare(actual, eager.output)
        compare(inputs, eager.inputs, "inputs after the call")
        check_aliasing(eager, inputs, actual, again)
    except AssertionError as exc:
        return Outcome(key, "failed", f"{_first_line(str(exc), 300)} on {case.describe}",
                       len(graphs))
    reasons = [_first_line(r.getMessage(), 300) for r in handler.records
               if r.levelno >= logging.WARNING and "runs eagerly" in r.getMessage()]
    breaks = [_first_line(k) for k in counters.get("graph_break", {})]
    if reasons or breaks:
        why = reasons[:2] + [f"graph break: {b}" for b in breaks[:2]]
        return Outcome(key, "fell_back", "; ".join(why), len(graphs))
    if graphs:
        return Outcome(key, "matched", "", len(graphs))
    seen = {k: dict(v) for k, v in counters.items()}
    return Outcome(key, "failed", "ran without fxforge compiling a graph and with no reason "
                                  f"logged (dynamo counters {seen})")


def compare(actual: Any, expected: Any, what: str = "output") -> None:
    """assert_close_to_eager, with NaN == NaN also for Python floats."""
    flat_a, spec_a = pytree.tree_flatten(actual)
    flat_e, spec_e = pytree.tree_flatten(expected)
    assert spec_a == spec_e, f"{what}: structure {spec_a} vs eager {spec_e}"
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        if isinstance(e, float) and isinstance(a, float) and math.isnan(e) and math.isnan(a):
            continue
        assert_close_to_eager(a, e, what=f"{what}[{i}]")


# ---------------------------------------------------------------------------------------
# The tests.

def _shard(index: int) -> list[str]:
    swept, _ = selection()
    return [k for k in swept if k not in XFAIL][index::SHARDS]


_RESULTS: dict[int, list[Outcome]] = {}  # shard -> outcomes, for the summary (one process)


def test_sweep_selection(capsys):
    swept, skipped = selection()
    with capsys.disabled():
        print(f"\n[op sweep] {len(swept)} op_db entries swept ({len(XFAIL)} known fxforge bugs "
              f"as xfail), {len(skipped)} skipped:")
        for key, reason in skipped:
            print(f"  skip {key}: {reason}")
    opinfos = _opinfos()
    assert len({opinfos[k].name for k in swept}) >= MIN_OPS
    # Each shard tries >= 90% of its ops (asserted there), so the sweep tries >= MIN_OPS.
    assert 0.9 * (len(swept) - len(XFAIL)) >= MIN_OPS
    assert not set(XFAIL) - set(swept), "XFAIL names an op that is not swept"
    # Every random op of the list the sweep must not compare is out.
    for name in ("randn", "normal", "bernoulli", "nn.functional.dropout", "multinomial", "uniform",
                 "empty", "new_empty", "empty_like", "exponential", "geometric", "cauchy",
                 "log_normal", "nn.functional.feature_alpha_dropout.with_train"):
        assert name not in swept


@pytest.mark.parametrize("shard", range(SHARDS))
def test_opdb_shard(shard, capsys):
    opinfos = _opinfos()
    outcomes = [run_op(key, opinfos[key]) for key in _shard(shard)]
    _RESULTS[shard] = outcomes
    by = Counter(o.status for o in outcomes)
    tried = by["matched"] + by["fell_back"] + by["failed"]
    with capsys.disabled():
        print(f"\n[op sweep shard {shard}/{SHARDS}] tried {tried}, matched {by['matched']}, "
              f"fell back {by['fell_back']}, failed {by['failed']}, skipped {by['skipped']}")
        for o in outcomes:
            if o.status != "matched":
                print(f"  {o.status:9s} {o.key}: {o.detail}")
        if len(_RESULTS) == SHARDS:
            _summary()
    failures = [o for o in outcomes if o.status == "failed"]
    assert not failures, "\n".join(f"{o.key}: {o.detail}" for o in failures)
    assert by["matched"] + by["fell_back"] == tried
    assert tried >= 0.9 * len(outcomes), f"only {tried} of {len(outcomes)} ops had a usable sample"
    assert by["matched"] >= MIN_MATCH_FRACTION * tried, (
        f"only {by['matched']} of {tried} ops compiled and matched")


def _reason_kind(detail: str) -> str:
    first = detail.split("; ")[0]
    if first.startswith("graph break: "):
        return "dynamo graph break: " + first[len("graph break: "):].split(":")[0]
    if "runs eagerly: " in first:
        return "fxforge runs eagerly: " + first.split("runs eagerly: ")[1][:50]
    return first[:80]


def _summary() -> None:
    everything = [o for outcomes in _RESULTS.values() for o in outcomes]
    by = Counter(o.status for o in everything)
    reasons = Counter(_reason_kind(o.detail) for o in everything if o.status == "fell_back")
    tried = by["matched"] + by["fell_back"] + by["failed"]
    print(f"[op sweep total] ops tried {tried}, matched {by['matched']}, "
          f"fell back {by['fell_back']}, failed {by['failed']}, skipped {by['skipped']} "
          f"(+{len(XFAIL)} xfail, "
          f"{len(selection()[1])} random/uninitialised not swept)")
    for reason, n in reasons.most_common():
        print(f"  fell back {n:3d}x  {reason}")


if XFAIL:  # defined only while there are known bugs: an empty parametrization would skip
    @pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.xfail(reason=r, strict=True),
                                                  id=k) for k, r in XFAIL.items()])
    def test_opdb_known_bug(key):
        outcome = run_op(key, _opinfos()[key])
        assert outcome.status in ("matched", "fell_back"), f"{key}: {outcome.detail}"
