"""The graph cache (fxforge/graph_cache.py): a graph compiled again after ``torch._dynamo.reset()``
(what a second process does) comes from the cache with no capture or pass, and computes exactly
what the compile that stored it did; a damaged, foreign or untrusted entry is ignored with one
warning and rebuilt; other weights, options or ISA are other entries."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import fxforge
from fxforge import graph_cache
from fxforge.examples.small_gpt import GPTConfig, SmallGPT
from fxforge.options import parse_options

HIT = "came from the graph cache"
CORE = ("gpt2", "llama", "mistral", "qwen2", "phi3", "opt", "gpt_neox", "bert", "t5")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The graph cache on, in a fresh folder of this test; yields the entries' folder."""
    from fxforge.kernels import cache_trust
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(root))
    monkeypatch.setenv("FXFORGE_GRAPH_CACHE", "1")
    cache_trust.reset()
    yield root / graph_cache.FOLDER
    cache_trust.reset()


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def _fresh_gpt() -> SmallGPT:
    return SmallGPT(GPTConfig(n_layer=2)).eval()


def _run(model, *inputs, **options):
    """A fresh compile (as in a new process: dynamo reset) and its outputs."""
    torch._dynamo.reset()
    compiled = fxforge.compile(model, **options)
    with torch.no_grad():
        return compiled(*inputs)


def _hits(caplog) -> int:
    return sum(HIT in r.getMessage() for r in caplog.records)


def _pass_logs(caplog) -> int:
    return sum(r.name == "fxforge.passes" for r in caplog.records)


def test_a_second_compile_comes_from_the_cache_bit_identical(cache, caplog):
    model, ids = _fresh_gpt(), torch.randint(0, 100, (2, 11))
    caplog.set_level(logging.INFO, logger="fxforge")
    first = _run(model, ids)
    assert len(_entries(cache)) == 1 and _hits(caplog) == 0 and _pass_logs(caplog) > 0
    caplog.clear()
    second = _run(model, ids)
    assert _hits(caplog) == 1 and _pass_logs(caplog) == 0   # no pass ran
    assert torch.equal(first, second)
    with torch.no_grad():
        torch.testing.assert_close(second, model(ids), rtol=1.3e-5, atol=1e-5)


@pytest.mark.parametrize("arch", CORE)
def test_the_ci_architectures_are_bit_identical_from_the_cache(cache, caplog, arch):
    from fxforge.examples.hf_models import LogitsOnly, build, example_inputs
    seed = int(torch.randint(0, 2**30, ()))
    model = LogitsOnly(build(arch, seed=seed))
    inputs = example_inputs(arch, batch=2, seq=9, seed=seed)
    caplog.set_level(logging.INFO, logger="fxforge")
    first = _run(model, *inputs)
    second = _run(model, *inputs)
    assert _hits(caplog) == 1, f"{arch}: the second compile did not come from the cache"
    assert torch.equal(first, second)


def test_kv_cached_generation_from_the_cache_gives_the_same_tokens_and_logits(cache, caplog):
    model, prompt = _fresh_gpt(), torch.randint(0, 100, (1, 7))
    caplog.set_level(logging.INFO, logger="fxforge")
    answers = []
    for _ in range(2):
        torch._dynamo.reset()
        compiled = fxforge.compile(model, kv_cache=True, max_seq_len=64)
        with torch.no_grad():
            logits = compiled(prompt)
        answers.append((logits, fxforge.generate(compiled, prompt, 6)))
    assert _hits(caplog) >= 1
    assert torch.equal(answers[0][0], answers[1][0])
    assert torch.equal(answers[0][1], answers[1][1])
    kv_entries = [e for e in _entries(cache)
                  if json.loads((e / graph_cache.ENTRY).read_text())["kv_cache"]]
    assert kv_entries, "the KV-cached graph was not stored with its step graph"


def _damage_weights(entry: Path) -> None:
    data = bytearray((entry / graph_cache.WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (entry / graph_cache.WEIGHTS).write_bytes(bytes(data))


def _truncate_graph(entry: Path) -> None:
    text = (entry / graph_cache.GRAPH).read_text()
    (entry / graph_cache.GRAPH).write_text(text[: len(text) // 2])


def _foreign_version(entry: Path) -> None:
    data = json.loads((entry / graph_cache.ENTRY).read_text())
    data["versions"]["torch"] = "1.0.0"
    (entry / graph_cache.ENTRY).write_text(json.dumps(data))


def _consistent_but_broken_graph(entry: Path) -> None:
    """A graph.json with a matching digest that names an op no stored graph may call."""
    import hashlib
    graph = json.loads((entry / graph_cache.GRAPH).read_text())
    node = next(n for n in graph["nodes"] if n.get("op") == "call_function")
    node["target"] = "builtins.eval"
    text = json.dumps(graph)
    (entry / graph_cache.GRAPH).write_text(text)
    data = json.loads((entry / graph_cache.ENTRY).read_text())
    data["files"][graph_cache.GRAPH] = hashlib.sha256(text.encode()).hexdigest()
    (entry / graph_cache.ENTRY).write_text(json.dumps(data))


def _writable_by_others(entry: Path) -> None:
    os.chmod(entry / graph_cache.GRAPH, 0o666)


@pytest.mark.parametrize("damage", [_damage_weights, _truncate_graph, _foreign_version,
                                    _consistent_but_broken_graph, _writable_by_others],
                         ids=["corrupted", "truncated", "foreign-version", "refused-op",
                              "writable-by-others"])
def test_a_bad_entry_is_ignored_with_one_warning_and_rebuilt(cache, caplog, damage):
    model, ids = _fresh_gpt(), torch.randint(0, 100, (1, 9))
    first = _run(model, ids)
    (entry,) = _entries(cache)
    damage(entry)
    caplog.set_level(logging.INFO, logger="fxforge")
    again = _run(model, ids)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage(), \
        [r.getMessage() for r in warnings]
    assert _hits(caplog) == 0 and _pass_logs(caplog) > 0   # compiled again
    assert torch.equal(first, again)
    caplog.clear()
    _run(model, ids)   # the rebuilt entry is good
    assert _hits(caplog) == 1


def test_other_weights_options_or_isa_are_other_entries(cache, monkeypatch):
    model, ids = _fresh_gpt(), torch.randint(0, 100, (1, 9))
    _run(model, ids)
    _run(model, ids, autotune="cache")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    _run(model, ids)
    monkeypatch.setenv("FXFORGE_CPU_ISA", "avx2")
    _run(model, ids)
    assert len(_entries(cache)) == 4


def test_lossy_options_are_not_cached(cache):
    options = parse_options(quantize="int8")
    assert options.lossy
    model, ids = _fresh_gpt(), torch.randint(0, 100, (1, 9))
    _run(model, ids, quantize="int8")
    assert _entries(cache) == []


def test_a_cached_graph_called_with_other_weights_compiles_them(cache, caplog):
    model, ids = _fresh_gpt(), torch.randint(0, 100, (1, 9))
    _run(model, ids)
    torch._dynamo.reset()
    caplog.set_level(logging.INFO, logger="fxforge")
    compiled = fxforge.compile(model)
    with torch.no_grad():
        compiled(ids)
        assert _hits(caplog) == 1
        for parameter in model.parameters():
            parameter.mul_(1.5)
        got = compiled(ids)
        torch.testing.assert_close(got, model(ids), rtol=1.3e-5, atol=1e-5)


def test_off_switch_and_eviction_by_size(cache, monkeypatch):
    model, ids = _fresh_gpt(), torch.randint(0, 100, (1, 9))
    monkeypatch.setenv("FXFORGE_GRAPH_CACHE", "0")
    _run(model, ids)
    assert _entries(cache) == []
    monkeypatch.setenv("FXFORGE_GRAPH_CACHE", "1")
    _run(model, ids)
    (first,) = _entries(cache)
    size = sum(p.stat().st_size for p in first.iterdir())
    monkeypatch.setenv("FXFORGE_GRAPH_CACHE_GB", str(1.5 * size / 2**30))   # room for one
    os.utime(first / graph_cache.ENTRY, (1, 1))   # the least recently used
    _run(_fresh_gpt(), ids)
    (kept,) = _entries(cache)
    assert kept != first


def test_entries_are_private(cache):
    _run(_fresh_gpt(), torch.randint(0, 100, (1, 9)))
    (entry,) = _entries(cache)
    assert entry.stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in entry.iterdir())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_block_reuse_shares_kernels_and_is_bit_identical(monkeypatch, arch):
    """Identical fusion groups (one per layer) get one kernel; outputs equal those of a
    lowering that builds every group's own."""
    from fxforge.backends import kernel_lowering
    from fxforge.compiler import recording
    from fxforge.examples.hf_models import LogitsOnly, build, example_inputs
    seed = int(torch.randint(0, 2**30, ()))
    model = LogitsOnly(build(arch, seed=seed))
    inputs = example_inputs(arch, batch=2, seq=9, seed=seed)
    outputs, kernels = [], []
    for reuse in (True, False):
        monkeypatch.setattr(kernel_lowering, "REUSE_BLOCKS", reuse)
        with recording() as graphs:
            outputs.append(_run(model, *inputs))
        targets = [n.target for g in graphs for n in g.lowered.gm.graph.nodes
                   if n.meta.get("fxf_kernel_group")]
        kernels.append({id(getattr(t, "call", t)) for t in targets})
        assert targets
    assert torch.equal(outputs[0], outputs[1])
    assert len(kernels[0]) <= len(kernels[1])
    if arch == "llama":   # RMSNorm and SwiGLU groups in every layer: shared
        assert len(kernels[0]) < len(kernels[1])
