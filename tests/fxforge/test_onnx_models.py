"""Round trips of whole models: torch model -> ``torch.onnx.export`` -> ``fxforge.from_onnx``
(imported into the IR, compiled by fxforge) -> equal to eager PyTorch at two sizes.

The small GPT, a CNN and the core Hugging Face architectures from configs run in CI (tiny
shapes); the others, and the real SmolLM2 and MiniLM against ONNX Runtime, are ``slow``."""
from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch
import torch.nn as nn

from fxforge.examples.small_cnn import make_cnn
from fxforge.examples.small_gpt import make_model
from fxforge.onnx import from_onnx

CI_ARCHS = ("llama", "bert", "t5")
SLOW_ARCHS = ("gpt2", "mistral", "qwen2", "phi3", "opt", "gpt_neox")


def _export(module: nn.Module, examples: tuple, dynamic: dict[str, dict[int, str]]) -> bytes:
    """ONNX bytes of ``module``: the legacy exporter where it works (fast), else dynamo's."""
    names = list(dynamic)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, examples, buffer, dynamo=False, input_names=names,
                              dynamic_axes=dynamic)
            return buffer.getvalue()
        except Exception:   # e.g. transformers' masks use aten::diff, which it lacks
            made: dict[str, torch.export.Dim] = {}
            shapes = tuple({a: made.setdefault(d, torch.export.Dim(d, min=2, max=1024))
                            for a, d in dynamic[n].items()} for n in names)
            program = torch.onnx.export(module, examples, dynamo=True, dynamic_shapes=shapes,
                                        input_names=names, verbose=False)
            return program.model_proto.SerializeToString()


def _assert_round_trip(module: nn.Module, make, dynamic, sizes, caplog, rtol=1e-4, atol=1e-4):
    data = _export(module, make(sizes[0], 0), dynamic)
    compiled = from_onnx(data)
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        for i, size in enumerate(sizes):
            inputs = make(size, i + 1)
            with torch.no_grad():
                torch.testing.assert_close(compiled(*inputs), module(*inputs), rtol=rtol, atol=atol)
    eager_runs = [r.getMessage() for r in caplog.records if "eager" in r.getMessage()]
    assert not eager_runs, eager_runs


def test_small_gpt_round_trip(caplog):
    model = make_model(seed=3, n_layer=2)

    def make(seq, seed):
        return (torch.randint(0, model.config.vocab_size, (2, seq),
                              generator=torch.Generator().manual_seed(seed)),)
    _assert_round_trip(model, make, {"idx": {0: "batch", 1: "seq"}}, (16, 23), caplog)


def test_cnn_round_trip(caplog):
    model = make_cnn(seed=4)

    def make(batch, seed):
        return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),)
    _assert_round_trip(model, make, {"x": {0: "batch"}}, (2, 5), caplog)


def _hf_params():
    return [pytest.param(a, id=a) for a in CI_ARCHS] + \
        [pytest.param(a, id=a, marks=pytest.mark.slow) for a in SLOW_ARCHS]


@pytest.mark.parametrize("arch", _hf_params())
def test_hf_architecture_round_trip(arch, caplog):
    pytest.importorskip("transformers")
    from fxforge.examples.hf_models import LogitsOnly, build, example_inputs
    model = LogitsOnly(build(arch)).eval()
    names = [f"input{i}" for i in range(len(example_inputs(arch, batch=2, seq=8)))]

    def make(seq, seed):
        return example_inputs(arch, batch=2, seq=seq, seed=seed)
    _assert_round_trip(model, make, {n: {0: "batch", 1: "seq"} for n in names}, (8, 13), caplog)


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_real_models_match_onnx_runtime(name, tmp_path):
    """The bench's models (bench/onnx_import.py), imported and compiled by fxforge, against
    ONNX Runtime at two lengths."""
    import importlib.util
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("onnx_import_bench", bench / "onnx_import.py")
        case = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(case)
    finally:
        sys.path.remove(str(bench))
    try:
        module, inputs, make = case.CASES[name](2)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "model.onnx"
    case.export_model(module, make(32, 0), path, inputs, dynamo=True)
    ort, compiled = case.ort_runner(path, 2), from_onnx(path)
    with torch.no_grad():
        for length in (32, 71):
            example = make(length, length)
            assert case.relative(compiled(*example), ort(*example)) < 1e-4
            assert case.relative(compiled(*example), module(*example)) < 1e-4
