"""W8A8 (``quantize="w8a8"``): the scheme's parsing, the SmoothQuant smoothing and the outlier guard
(passes/smoothquant.py) against references computed here, the pass's graphs on the reference and
CPU backends, and artifacts."""
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

import fxforge
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import (W8A8, WeightFormatError, decode, w8a8_matmul,
                                           w8a8_quantize_rows)
from fxforge.options import OptionsError, parse_options
from fxforge.passes import smoothquant
from fxforge.passes.quantize import QuantizeSpecError, parse_quantize, parse_scheme
from fxforge.passes.quantize_math import quantize_int8_channel


def _gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)   # shown on failure
    return torch.Generator().manual_seed(seed)


class _Mlp(torch.nn.Module):
    def __init__(self, gen: torch.Generator, k: int = 48, hidden: int = 80):
        super().__init__()
        self.up, self.down = torch.nn.Linear(k, hidden), torch.nn.Linear(hidden, k)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def _inputs(gen: torch.Generator, rows: int = 24, k: int = 48, outlier: float = 0.0) -> torch.Tensor:
    x = torch.randn(rows, k, generator=gen)
    if outlier:   # channel 5 carries values far above the rest in every row (as LLMs' do)
        x[:, 5] = outlier * (1 + torch.rand(rows, generator=gen))
    return x


def _formats(ir) -> list:
    return [lin.weight_format for lin in map(Linear.of, ir.gm.graph.nodes) if lin is not None]


def test_schemes_parse_and_bad_modifiers_are_named():
    assert parse_scheme("w8a8") == "w8a8:smooth+guard"
    assert parse_scheme("w8a8:nosmooth") == "w8a8:guard"
    assert parse_scheme("w8a8:noguard") == "w8a8:smooth"
    assert parse_scheme("w8a8:noguard:nosmooth") == "w8a8:plain"
    assert parse_scheme(parse_scheme("w8a8:noguard")) == "w8a8:smooth"   # parsed: as it is
    rules = parse_quantize({"default": "w8a8", "lm_head": "int8"})
    assert rules == (("lm_head", "int8_channel:rtn"), ("*", "w8a8:smooth+guard"))
    with pytest.raises(QuantizeSpecError, match="unknown w8a8 modifier 'gptq'"):
        parse_scheme("w8a8:gptq")
    with pytest.raises(OptionsError, match="option quantize: unknown w8a8 modifier 'x'"):
        parse_options({"quantize": "w8a8:x"})
    with pytest.raises(QuantizeSpecError, match="'w8a8' .W8A8 dynamic"):
        parse_scheme("w8a9")


def test_smoothing_factors_follow_the_formula():
    gen = _gen()
    act = torch.rand(32, generator=gen) * 10
    weight = torch.randn(16, 32, generator=gen)
    act[3], weight[:, 7] = 0, 0   # a dead channel of each kind: no smoothing there
    for alpha in (0.5, 0.8):
        want = act ** alpha / weight.abs().amax(0) ** (1 - alpha)
        want[3] = want[7] = 1
        torch.testing.assert_close(smoothquant.smoothing_factors(act, weight, alpha), want,
                                   rtol=1e-6, atol=0)


def test_the_format_checks_its_smoothing_vector():
    codes = torch.zeros(8, 4, dtype=torch.int8)
    scales = torch.ones(1, 4, dtype=torch.float16)
    with pytest.raises(WeightFormatError, match=r"offsets must be float32 \[8, 1\]"):
        decode(codes, W8A8, scales, torch.ones(8, 1, dtype=torch.float16))
    with pytest.raises(WeightFormatError, match="takes scales, offsets"):
        decode(codes, W8A8, scales)


def _want(model: _Mlp, calibration: torch.Tensor, smooth: bool):
    """The W8A8 model computed here: smoothing from the fp32 model's activations on
    ``calibration``, each linear as ``w8a8_matmul`` of its smoothed, int8-quantized weight."""
    seen = {"up": calibration, "down": torch.relu(model.up(calibration))}
    params = {}
    for name, inputs in seen.items():
        weight = getattr(model, name).weight.detach()
        act, w = inputs.abs().amax(0), weight.abs().amax(0)
        s = torch.where((act > 0) & (w > 0), act.sqrt() / w.sqrt(), 1.0) if smooth \
            else torch.ones(weight.shape[1])   # a dead channel (relu: never active): 1
        codes, scales = quantize_int8_channel(weight / (1 / s), "rtn")
        params[name] = (codes.t(), scales.t(), (1 / s).reshape(-1, 1))

    def run(x):
        def lin(name, v):
            return w8a8_matmul(v, *params[name]) + getattr(model, name).bias
        return x + lin("down", torch.relu(lin("up", x)))
    return run


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("scheme", ["w8a8:noguard", "w8a8:nosmooth:noguard"])
def test_the_pass_computes_the_smoothed_w8a8_model(backend, scheme):
    gen = _gen()
    model = _Mlp(gen).eval()
    # x has the example's shape: a new shape would recompile, calibrated on x itself
    calibration, x = _inputs(gen, outlier=8.0), _inputs(gen, outlier=8.0)
    compiled = fxforge.compile(model, (calibration,), quantize=scheme, backend=backend)
    with torch.no_grad():
        want = _want(model, calibration, smooth="nosmooth" not in scheme)
        torch.testing.assert_close(compiled(x), want(x), rtol=1e-5, atol=1e-5)
        # and within int8's error of the fp32 model (a few % of its norm with an outlier channel)
        assert float((compiled(x) - model(x)).norm() / model(x).norm()) < 0.03


def test_smoothing_lowers_the_error_of_an_outlier_channel():
    gen = _gen()
    model = _Mlp(gen).eval()
    with torch.no_grad():
        model.up.weight[:, 5] *= 0.01   # the outlier channel meets small weights (as in LLMs)
    calibration, x = _inputs(gen, outlier=200.0), _inputs(gen, outlier=200.0)
    with torch.no_grad():
        errors = {s: float((fxforge.compile(model, (calibration,), quantize=s, backend="reference")(x)
                            - model(x)).norm()) for s in ("w8a8:noguard", "w8a8:nosmooth:noguard")}
    assert errors["w8a8:noguard"] < 0.5 * errors["w8a8:nosmooth:noguard"]


def test_the_guard_keeps_an_outlier_linear_weight_only_and_says_so(caplog):
    gen = _gen()
    model = _Mlp(gen).eval()
    with torch.no_grad():
        model.up.weight[:, 5] *= 0.01
    calibration = _inputs(gen, outlier=200.0)
    with caplog.at_level(logging.INFO, logger="fxforge.passes.quantize"):
        report = fxforge.explain(model, calibration, count_eager=False, quantize="w8a8:nosmooth")
    assert "up.weight: int8 activations would add a" in caplog.text
    assert "down.weight: int8 activations" not in caplog.text
    rows = {line.split()[-1]: line.split()[1] for line in report.text.splitlines()
            if line.strip().startswith("linear_") and line.split()[-1].endswith(".weight")}
    assert rows == {"up.weight": "int8_channel", "down.weight": W8A8}
    assert "w8a8_guarded=1" in report.text
    caplog.clear()   # the same rows smoothed: no outlier left, nothing guarded
    with caplog.at_level(logging.INFO, logger="fxforge.passes.quantize"):
        report = fxforge.explain(model, calibration, count_eager=False, quantize="w8a8")
    assert "int8 activations would add" not in caplog.text and "w8a8=2" in report.text


def test_without_outliers_nothing_is_guarded():
    gen = _gen()
    model = _Mlp(gen).eval()
    report = fxforge.explain(model, _inputs(gen), count_eager=False, quantize="w8a8:nosmooth")
    assert "w8a8=2" in report.text and "guarded=1" not in report.text


def test_without_calibration_inputs_it_says_so_and_does_not_smooth(caplog):
    from fxforge.irgraph.capture import capture_export
    from fxforge.passes import PassManager
    from fxforge.passes.quantize import quantize_pass
    model = _Mlp(_gen()).eval()
    ir = PassManager(["fuse_epilogues"]).run(capture_export(model, (torch.randn(2, 48),)))
    with caplog.at_level("WARNING", logger="fxforge.passes.quantize"):
        out = PassManager([quantize_pass(parse_quantize("w8a8"))]).run(ir)
    assert "w8a8 smoothing and its outlier guard need the compile's example inputs" in caplog.text
    assert out.info["passes"][-1].counts["w8a8"] == 2
    smooths = [getattr(out.gm, n.all_input_nodes[0].target) for n in out.gm.graph.nodes
               if (lin := Linear.of(n)) is not None for n in [lin.offsets]]
    assert len(smooths) == 2 and all(torch.equal(s, torch.ones_like(s)) for s in smooths)


def test_a_nan_row_gives_nan_outputs_in_the_compiled_model():
    gen = _gen()
    model = _Mlp(gen).eval()
    compiled = fxforge.compile(model, (_inputs(gen),), quantize="w8a8", backend="cpu")
    x = _inputs(gen)   # the example's shape: no recompile (which would calibrate on x)
    x[1, 0] = float("nan")
    with torch.no_grad():
        y = compiled(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, *range(2, len(x))]]).all()


def test_an_artifact_stores_codes_scales_and_smoothing_and_loads_them(tmp_path):
    gen = _gen()
    model = _Mlp(gen).eval()
    calibration, x = _inputs(gen, outlier=8.0), _inputs(gen, outlier=8.0)
    fxforge.aot_compile(model, (calibration,), str(tmp_path / "w8a8"), quantize="w8a8:noguard")
    stored = load_file(str(tmp_path / "w8a8" / "weights.safetensors"))
    dtypes = sorted(str(t.dtype) for t in stored.values())
    assert dtypes.count("torch.int8") == 2 and dtypes.count("torch.float16") == 2
    assert not any(t.dtype == torch.float32 and t.dim() == 2 and min(t.shape) > 1
                   for t in stored.values())   # no fp32 weight matrix left
    loaded = fxforge.load(str(tmp_path / "w8a8"))
    assert sorted(_formats(loaded.ir)) == [W8A8, W8A8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _want(model, calibration, smooth=True)(x),
                                   rtol=1e-5, atol=1e-5)


def test_the_reference_quantizes_rows_symmetrically_per_row():
    gen = _gen()
    x = torch.randn(6, 40, generator=gen) * torch.rand(6, 1, generator=gen) * 10
    smooth = torch.rand(40, generator=gen) + 0.5
    codes, scales = w8a8_quantize_rows(x, smooth)
    rows = x * smooth
    torch.testing.assert_close(scales, rows.abs().amax(1) / 127, rtol=0, atol=0)
    assert (codes.abs().amax(1) == 127).all()
    assert ((codes.float() * scales[:, None] - rows).abs() <= scales[:, None] / 2 * 1.0001).all()


@pytest.mark.parametrize("scheme", ["w8a8", "int8:gptq"])
def test_calibrating_schemes_keep_the_decode_loop_dynamic(scheme):
    """Dynamo hands a dynamic dim's example as a SymInt; a calibration run on it would guard
    its value and specialize the graph, so each new length would recompile (a decode loop hit
    dynamo's recompile limit and ran eagerly). Two graphs (the static first, then the dynamic
    one) must serve every length."""
    from fxforge.compiler import recording
    from fxforge.examples.small_gpt import make_model
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    model = make_model().eval()
    ids = torch.randint(0, 500, (1, 12), generator=gen)
    compiled = torch.compile(model, backend="fxforge",
                             options={"kv_cache": True, "quantize": scheme})
    with recording() as graphs, torch.no_grad():
        fxforge.generate(compiled, ids, max_new_tokens=12)
    assert len(graphs) <= 2, f"{len(graphs)} compiles for 12 new tokens: the length was specialized"
