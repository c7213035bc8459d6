"""End to end: ``torch.compile(backend="fxforge")`` on tiny random-weight transformers models.

Every architecture in ``fxforge.examples.hf_models`` is compiled whole (``fullgraph=True``)
and called at three sequence lengths: the first compiles a static graph, the second makes
dynamo recompile with a dynamic sequence length (automatic dynamic shapes), the third must
reuse that dynamic graph. Each output must match eager within fp32 tolerance, and fxforge
must really have compiled every graph: no "runs eagerly" warning from its loggers, one
partition per graph with no per-node eager fallback, and the pass pipeline run on it.

A KV-cached decode step (``DecodeStep``) is checked the same way. The seven architectures
beyond the nine core families (and two of the decode steps) are marked ``slow``: dynamo's
own tracing costs 3-10 s per model, so the default run stays near a minute.
"""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

import fxforge  # noqa: F401,E402  (registers the backend)
import fxforge.compiler  # noqa: E402
from fxforge.examples import hf_models  # noqa: E402
from fxforge.examples.hf_models import (ARCHITECTURES, DecodeStep, LogitsOnly, build,  # noqa: E402
                                        decode_inputs, example_inputs)
from fxforge.irgraph import TensorMeta  # noqa: E402
from fxforge.testing import assert_close_to_eager  # noqa: E402

CORE = ("gpt2", "llama", "mistral", "qwen2", "phi3", "opt", "gpt_neox", "bert", "t5")
BATCH = 2
SEQS = (8, 13, 5)  # static compile, dynamic recompile, reuse of the dynamic graph

# Mixtral's default experts implementation calls a ``transformers::`` custom op (a Python
# loop over experts) that fxforge cannot lower and runs eagerly on purpose; "batched_mm"
# expresses the experts in plain ATen. The default is checked by test_mixtral_custom_op_...
OVERRIDES = {"mixtral": dict(experts_implementation="batched_mm")}


def _params():
    out = []
    for arch in ARCHITECTURES:
        marks = () if arch in CORE else (pytest.mark.slow,)
        out.append(pytest.param(arch, id=arch, marks=marks))
    return out


@pytest.fixture
def compiled_graphs(monkeypatch):
    """Every CompiledGraph fxforge builds while the test runs, in order."""
    graphs = []
    original = fxforge.compiler.compile_captured

    def recording(*args, **kwargs):
        graph = original(*args, **kwargs)
        graphs.append(graph)
        return graph

    monkeypatch.setattr(fxforge.compiler, "compile_captured", recording)
    return graphs


def _fresh_seeds(n: int) -> list[int]:
    # Drawn from torch's RNG, which conftest seeds freshly per test (and reports on failure).
    return [int(s) for s in torch.randint(0, 2**31 - 1, (n,))]


def _fxforge_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("fxforge") and r.levelno >= logging.WARNING]


def _is_dynamic(graph) -> bool:
    metas = [p.meta.get("fxf") for p in graph.captured.placeholders()]
    return any(isinstance(m, TensorMeta) and not m.is_static for m in metas)


def _check_structure(graph) -> None:
    assert graph.lowered.backend == "cpu"  # backend="auto" on a CPU
    assert graph.lowered.fallbacks == [], f"per-node eager fallbacks: {graph.lowered.fallbacks}"
    kernel_fallbacks = [c for c in graph.lowered.choices if "fallback" in c.path]
    assert not kernel_fallbacks, f"kernels that fell back: {kernel_fallbacks}"
    assert graph.lowered.partitions == 1
    ran = [s.name for s in graph.ir.info.get("passes", [])]
    assert ran, "the pass pipeline did not run"
    failed = [s.error for s in graph.ir.info["passes"] if s.error]
    assert not failed, failed
    assert graph.weight_positions, "no weights were frozen into the graph"


@pytest.mark.models
@pytest.mark.parametrize("arch", _params())
def test_architecture_matches_eager(arch, caplog, compiled_graphs):
    caplog.set_level(logging.INFO, logger="fxforge")
    model_seed, *input_seeds = _fresh_seeds(1 + len(SEQS))
    model = LogitsOnly(build(arch, seed=model_seed, **OVERRIDES.get(arch, {})))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxforge", fullgraph=True)
    seen = []
    with torch.no_grad():
        for seq, seed in zip(SEQS, input_seeds):
            inputs = example_inputs(arch, batch=BATCH, seq=seq, seed=seed)
            expected = model(*inputs)
            actual = compiled(*inputs)
            assert_close_to_eager(actual, expected, what=f"{arch} logits at seq={seq}")
            seen.append(len(compiled_graphs))

    assert not _fxforge_warnings(caplog), _fxforge_warnings(caplog)
    # One static graph, one dynamic recompile, then reuse: no third compile.
    assert seen == [1, 2, 2], f"graphs compiled after each call: {seen}"
    static, dynamic = compiled_graphs
    assert not _is_dynamic(static), "first graph should have static shapes"
    assert _is_dynamic(dynamic), "recompile should have a symbolic sequence length"
    for graph in compiled_graphs:
        _check_structure(graph)
    compiled_logs = [r for r in caplog.records
                     if r.name == "fxforge" and "fxforge: compiled a graph" in r.getMessage()]
    assert len(compiled_logs) == 2
    torch._dynamo.reset()


@pytest.mark.models
@pytest.mark.slow
def test_mixtral_custom_op_runs_eagerly_with_reason(caplog, compiled_graphs):
    """A transformers custom op is not an IR op: it runs eagerly, logged; the result stays right."""
    caplog.set_level(logging.INFO, logger="fxforge")
    model_seed, input_seed = _fresh_seeds(2)
    model = LogitsOnly(build("mixtral", seed=model_seed))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxforge", fullgraph=True)
    inputs = example_inputs("mixtral", batch=BATCH, seq=SEQS[0], seed=input_seed)
    with torch.no_grad():
        assert_close_to_eager(compiled(*inputs), model(*inputs))
    warnings = _fxforge_warnings(caplog)
    assert warnings, "the custom op should be reported as running eagerly"
    assert all("grouped_mm_fallback" in w and "runs eagerly" in w for w in warnings), warnings
    (graph,) = compiled_graphs
    assert graph.lowered.fallbacks and graph.lowered.partitions >= 2
    torch._dynamo.reset()


@pytest.mark.models
@pytest.mark.parametrize("arch", [pytest.param("llama", id="llama"),
                                  pytest.param("gpt2", id="gpt2", marks=pytest.mark.slow),
                                  pytest.param("gemma2", id="gemma2", marks=pytest.mark.slow)])
def test_kv_cached_decode_step_matches_eager(arch, caplog, compiled_graphs):
    """One decode step over a real KV cache (cache concat + attention to the past), at three
    cache lengths (gemma2's sliding window is 8: lengths stay below it so that DecodeStep can
    rebuild the cache from tensors)."""
    caplog.set_level(logging.INFO, logger="fxforge")
    model_seed, *input_seeds = _fresh_seeds(1 + len(SEQS))
    model = build(arch, seed=model_seed, use_cache=True)
    step = DecodeStep(model)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="fxforge", fullgraph=True)
    seen = []
    with torch.no_grad():
        for past, seed in zip((6, 7, 5), input_seeds):
            inputs = decode_inputs(model, past_len=past, batch=BATCH, seed=seed)
            assert_close_to_eager(compiled(*inputs), step(*inputs),
                                  what=f"{arch} decode logits, past={past}")
            seen.append(len(compiled_graphs))
    assert not _fxforge_warnings(caplog), _fxforge_warnings(caplog)
    # Static, then dynamic; the third length may recompile on a dynamo guard (gemma2 guards
    # on the cache length against its sliding window), which is dynamo's business.
    assert seen[:2] == [1, 2], f"graphs compiled after each call: {seen}"
    assert _is_dynamic(compiled_graphs[1])
    for graph in compiled_graphs:
        _check_structure(graph)
    torch._dynamo.reset()


def test_zoo_is_covered():
    """The parametrization follows the zoo; the core set stays inside it."""
    assert set(CORE) <= set(ARCHITECTURES)
    assert hf_models.task_of("t5") == "seq2seq"
