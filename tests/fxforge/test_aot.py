"""AOT artifacts: round trip in a fresh process, the CLI, and every bad-artifact/bad-input case."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxforge
from fxforge.examples.small_gpt import make_model
from fxforge.testing import assert_close_to_eager

SEQ = torch.export.Dim("seq", min=2, max=128)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch._dynamo.reset()
    model = make_model(seed=3, n_layer=2)
    idx = torch.randint(0, 512, (2, 16))
    path = tmp_path_factory.mktemp("art") / "gpt"
    fxforge.aot_compile(model, (idx,), path, dynamic_shapes=({1: SEQ},))
    return model, path


def test_round_trip_in_a_fresh_process_that_never_imports_the_model(artifact, tmp_path):
    model, path = artifact
    x = torch.randint(0, 512, (2, 37))
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys, torch, fxforge
        art = fxforge.load({str(path)!r})
        out = art(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.save(out, {str(tmp_path / 'out.pt')!r})
        leaked = [m for m in sys.modules if m.startswith("fxforge.examples")]
        print("model modules imported:", leaked)
        print("compiled by dynamo:", torch._dynamo.utils.counters["stats"]["unique_graphs"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "model modules imported: []" in result.stdout
    assert "compiled by dynamo: 0" in result.stdout
    with torch.no_grad():
        assert_close_to_eager(torch.load(tmp_path / "out.pt"), model(x))


def test_manifest_records_versions_options_inputs_and_hashes(artifact):
    _, path = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["fxforge"] == fxforge.__version__
    assert manifest["inputs"] == [{"name": "idx", "dtype": "int64", "shape": ["2", "seq"]}]
    assert manifest["ranges"] == {"seq": [2, 128]}
    assert set(manifest["files"]) == {"graph.json", "weights.safetensors"}
    assert manifest["options"]["precision"] == "fp32"


@pytest.mark.parametrize("bad, message", [
    (torch.randint(0, 512, (3, 16)), "dim 0 must be 2"),
    (torch.randint(0, 512, (2, 200)), r"outside the compiled range \[2, 128\]"),
    (torch.randn(2, 16), "expected dtype torch.int64"),
    (torch.randint(0, 512, (2, 16, 1)), "expected 2 dims"),
])
def test_bad_inputs_are_named(artifact, bad, message):
    art = fxforge.load(artifact[1])
    with pytest.raises(fxforge.InputSpecError, match=message):
        art(bad)
    with pytest.raises(fxforge.InputSpecError, match="expected 1 inputs"):
        art(bad, bad)


def _copy(path, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_missing_tampered_and_foreign_artifacts_are_named(artifact, tmp_path):
    _, path = artifact
    with pytest.raises(fxforge.ArtifactError, match="does not exist"):
        fxforge.load(tmp_path / "nowhere")
    art = _copy(path, tmp_path)
    (art / "weights.safetensors").unlink()
    with pytest.raises(fxforge.ArtifactError, match="weights.safetensors is missing"):
        fxforge.load(art)
    art = _copy(path, tmp_path / "b")
    graph = json.loads((art / "graph.json").read_text())
    graph["nodes"][-2]["target"] = "aten.sub.Tensor"
    (art / "graph.json").write_text(json.dumps(graph))
    with pytest.raises(fxforge.ArtifactError, match="graph.json was modified"):
        fxforge.load(art)
    art = _copy(path, tmp_path / "c")
    with open(art / "weights.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(fxforge.ArtifactError, match="weights.safetensors was modified"):
        fxforge.load(art)
    art = _copy(path, tmp_path / "d")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["torch"] = "1.13.0"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxforge.ArtifactError, match="built with torch 1.13.0"):
        fxforge.load(art)
    (art / "manifest.json").write_text("{ not json")
    with pytest.raises(fxforge.ArtifactError, match="not valid JSON"):
        fxforge.load(art)


def test_cli_compiles_and_reports_errors(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "fxforge", "compile", "fxforge.examples.small_gpt:make_model",
           "--example", "int64[1,seq=8:2..64]{0..512}", "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    art = fxforge.load(out)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert_close_to_eager(art(x), make_model()(x))
    bad = subprocess.run(cmd[:5] + ["--example", "int64[1,8", "-o", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "bad input spec" in bad.stderr
    bad = subprocess.run(cmd + ["--option", "precision=int2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "precision must be one of" in bad.stderr


def test_a_loaded_artifact_builds_the_same_kernels_as_the_compile(artifact):
    """The loaded graph gets its fake example values back (symbolic sequence length included),
    so every fusion group builds its generated kernel again instead of running op by op."""
    from fxforge.explain import _is_fallback_path
    model, path = artifact
    loaded = fxforge.load(path)
    groups = [c for c in loaded.lowered.choices if c.node.startswith("fused")]
    assert groups and all("C++" in c.path for c in groups), groups
    assert not [c for c in loaded.lowered.choices if _is_fallback_path(c.path)]
    assert not loaded.lowered.fallbacks
    ids = torch.randint(0, 512, (2, 23))
    with torch.no_grad():
        assert_close_to_eager([loaded(ids)], [model(ids)])


def test_a_loaded_kv_cache_artifact_builds_the_kernels_of_the_compile(tmp_path, caplog):
    """kv_cache=True: the step graph, propagated again on load, gets all its example values back
    (the cached attention's result keeps q's layout, so the view after it is valid) and builds
    the kernels the compile built for it -- its fusion group included -- with eager's tokens."""
    import logging

    from fxforge.backends import lower
    from fxforge.irgraph import capture_export
    from fxforge.options import parse_options
    from fxforge.orchestrate import compile_graph

    model = make_model(seed=5, n_layer=1)
    ids = torch.randint(0, 512, (1, 8))
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        fxforge.aot_compile(model, (ids,), tmp_path / "kv", dynamic_shapes=({1: SEQ},),
                            kv_cache=True, max_seq_len=64)
        loaded = fxforge.load(tmp_path / "kv")
    assert not [r for r in caplog.records if "no example values" in r.getMessage()
                or "op by op" in r.getMessage()], caplog.text
    with torch.no_grad():   # what aot_compile lowered the step graph to
        options = parse_options(kv_cache=True, max_seq_len=64)
        ir = capture_export(model, (ids,), dynamic_shapes=({1: SEQ},))
        prepared = compile_graph(ir, options, stages=("passes", "kv_step"))
        compiled = lower(prepared.plan.ir, prepared.backend)
    assert [(c.node, c.path) for c in loaded.kv.step.choices] == \
        [(c.node, c.path) for c in compiled.choices]
    assert any(c.node.startswith("fused") and "C++" in c.path for c in loaded.kv.step.choices)
    assert not loaded.kv.step.fallbacks
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fxforge.generate(loaded, ids, 6), expected)


@pytest.mark.parametrize("error", [RuntimeError("no kernel for this graph"),
                                   ValueError("operands do not fit"), NotImplementedError("op")])
def test_a_failure_to_build_kernels_is_an_artifact_error_naming_it(artifact, monkeypatch, error):
    """Lowering runs what a stored graph names: whatever it raises is the artifact's problem,
    said as such (the cause chained), not a raw traceback and not a KV-cache plan's misfit."""
    def failing_lower(*args, **kwargs):
        raise error
    monkeypatch.setattr("fxforge.orchestrate.lower", failing_lower)
    with pytest.raises(fxforge.ArtifactError, match="building its kernels failed") as info:
        fxforge.load(artifact[1])
    assert info.value.__cause__ is error and "KV-cache" not in str(info.value)


def test_a_kv_cache_plan_that_does_not_fit_its_step_graph_is_named(tiny_gpt_artifact, tmp_path):
    from tests.fxforge.hostile_crafting import rehash
    art = _copy(tiny_gpt_artifact, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["kv_cache"]["tokens"] = 9   # the step graph has no tenth input
    (art / "manifest.json").write_text(json.dumps(manifest))
    rehash(art)
    with pytest.raises(fxforge.ArtifactError, match="KV-cache plan does not fit its step graph"):
        fxforge.load(art)


def test_an_input_sized_by_a_later_inputs_dynamic_size_round_trips(tmp_path):
    """``x`` is [2, 2*s], ``y`` [2, s]: the graph's ``2*s94`` is matched with the manifest's
    ``2*s`` once ``y`` names ``s``; the manifest keeps the range of ``s`` alone (``2*s``'s
    follows from it)."""
    class Strided(torch.nn.Module):
        def forward(self, x, y):
            return x[:, ::2] + y
    s = torch.export.Dim("s", min=2, max=32)
    fxforge.aot_compile(Strided(), (torch.randn(2, 8), torch.randn(2, 4)), tmp_path / "a",
                        dynamic_shapes=({1: 2 * s}, {1: s}))
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["ranges"] == {"s": [2, 32]}
    x, y = torch.randn(2, 12), torch.randn(2, 6)
    torch.testing.assert_close(fxforge.load(tmp_path / "a")(x, y), Strided()(x, y))
