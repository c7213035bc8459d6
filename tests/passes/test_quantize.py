"""Weight-only quantization: the formats' codecs, the quantizers, the option and the pass.

The pass is checked against eager on a model whose linears hold the decoded weights (what a
quantized graph means), so any difference is the pass's, not quantization error."""
import os

import pytest
import torch
from safetensors.torch import load_file

import fxforge
from fxforge.irgraph.weight_format import (WeightFormatError, decode, pack_nibbles,
                                           unpack_nibbles, weight_format)
from fxforge.options import parse_options
from fxforge.passes.quantize import QuantizeSpecError, parse_quantize, rule_for
from fxforge.passes.quantize_math import QuantizeError, quantize_int4, quantize_int8_channel


def _generator() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)   # shown on failure
    return torch.Generator().manual_seed(seed)


def _weights(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, k, generator=gen) * 0.05


def _decode_nk(fmt: str, codes, scales, offsets=None) -> torch.Tensor:
    """The [N, K] values of quantizer output ([N, ...] tensors) through the IR's decode."""
    if fmt.startswith("int4"):
        codes = pack_nibbles(codes.t()).t()
    return decode(codes.t(), fmt, scales.t(), offsets.t() if offsets is not None else None).t()


def test_nibbles_round_trip():
    values = torch.randint(0, 16, (64, 7), generator=_generator())
    packed = pack_nibbles(values)
    assert packed.shape == (32, 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), values.to(torch.uint8))
    assert torch.equal(packed[0] & 15, values[0].to(torch.uint8))   # low nibble: the even k


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_decode_is_codes_times_scale_plus_offset(group):
    gen = _generator()
    k, n = 2 * group, 5
    values = torch.randint(0, 16, (k, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen).half()
    offsets = torch.randn(k // group, n, generator=gen).half()
    got = decode(pack_nibbles(values), f"int4_g{group}", scales, offsets)
    want = values.float() * scales.float().repeat_interleave(group, 0) + \
        offsets.float().repeat_interleave(group, 0)
    assert torch.equal(got, want)


def test_formats_check_their_tensors():
    codes = torch.zeros(32, 4, dtype=torch.uint8)   # K = 64: two groups of 32
    with pytest.raises(WeightFormatError, match="offsets"):
        decode(codes, "int4_g32", torch.ones(2, 4).half(), None)
    with pytest.raises(WeightFormatError, match=r"scales must be float16 \[2, 4\]"):
        decode(codes, "int4_g32", torch.ones(3, 4).half(), torch.ones(2, 4).half())
    with pytest.raises(WeightFormatError, match="int8"):
        decode(codes, "int8_channel", torch.ones(1, 4).half())
    assert weight_format("int4_g64").in_features(codes) == 64


@pytest.mark.parametrize("fmt", ["int8_channel", "int4_g32", "int4_g64", "int4_g128"])
def test_mse_rounding_beats_round_to_nearest(fmt):
    weight = _weights(48, 256, _generator())
    errors = {}
    for rounding in ("rtn", "mse"):
        if fmt == "int8_channel":
            codes, scales = quantize_int8_channel(weight, rounding)
            assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
            decoded = _decode_nk(fmt, codes, scales)
        else:
            codes, scales, offsets = quantize_int4(weight, int(fmt.split("_g")[1]), rounding)
            assert int(codes.max()) <= 15
            decoded = _decode_nk(fmt, codes, scales, offsets)
        errors[rounding] = float(((decoded - weight) ** 2).sum())
    # the search includes the full range; refits only lower a candidate's error (up to fp16
    # rounding of the scale); on Gaussian weights clipping wins clearly at 4 bits
    assert errors["mse"] <= errors["rtn"] * (0.95 if fmt.startswith("int4") else 1.0 + 1e-6)


def test_quantizers_name_what_they_cannot_take():
    with pytest.raises(QuantizeError, match="layers.3.mlp: 100 input features.*group size 64"):
        quantize_int4(torch.randn(4, 100), 64, name="layers.3.mlp")
    bad = torch.randn(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(QuantizeError, match="NaN"):
        quantize_int8_channel(bad, name="w")


def test_quantize_option_parses_to_hashable_rules():
    rules = parse_quantize({"default": "int4:g64", "lm_head": "int8", "skip": ["layers.0.*"]})
    assert rules == (("layers.0.*", "none"), ("lm_head", "int8_channel:rtn"), ("*", "int4_g64:rtn"))
    assert parse_quantize(rules) == rules and parse_quantize([list(r) for r in rules]) == rules
    assert rule_for(rules, "layers.0.mlp.up_proj.weight") is None
    assert rule_for(rules, "lm_head.weight") == "int8_channel:rtn"
    assert parse_quantize("int8:mse") == (("*", "int8_channel:mse"),)
    assert rule_for(rules, "layers.2.q.weight,layers.2.k.weight") == "int4_g64:rtn"
    options = parse_options(quantize={"default": "int4:g32:rtn"})
    assert hash(options) == hash(parse_options(options.to_dict()))
    assert parse_quantize("gguf:/m/a:b.gguf") == (("*", "gguf:/m/a:b.gguf"),)
    for bad in ("int3", "int4:g48", {"skip": ["x"]}, {"default": 4}, "gguf:"):
        with pytest.raises(fxforge.OptionsError, match="quantize"):
            parse_options(quantize=bad)
    with pytest.raises(QuantizeSpecError):
        parse_quantize([])


class _MLP(torch.nn.Module):
    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64, bias=False)
        self.head = torch.nn.Linear(64, 96)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.1

    def forward(self, x):
        return self.head(x + self.down(torch.nn.functional.gelu(self.up(x))))


def _dequantized_copy(model: _MLP, schemes: dict) -> _MLP:
    """``model`` with each named linear's weight replaced by its decoded quantization."""
    copy = _MLP(torch.Generator().manual_seed(0))
    copy.load_state_dict(model.state_dict())
    for name, scheme in schemes.items():
        linear = getattr(copy, name)
        fmt, rounding = scheme.split(":")
        if fmt == "int8_channel":
            decoded = _decode_nk(fmt, *quantize_int8_channel(linear.weight.data, rounding))
        else:
            group = int(fmt.split("_g")[1])
            decoded = _decode_nk(fmt, *quantize_int4(linear.weight.data, group, rounding))
        linear.weight.data = decoded
    return copy


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pass_computes_the_decoded_model(backend):
    gen = _generator()
    model = _MLP(gen).eval()
    x = torch.randn(5, 64, generator=gen)
    option = {"default": "int4:g32", "head": "int8:rtn", "skip": ["down"]}
    want = _dequantized_copy(model, {"up": "int4_g32:rtn", "head": "int8_channel:rtn"})
    compiled = fxforge.compile(model, (x,), quantize=option, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-5)   # it did quantize


def test_an_artifact_stores_the_codes_and_loads_without_requantizing(tmp_path):
    gen = _generator()
    model = _MLP(gen).eval()
    x = torch.randn(3, 64, generator=gen)
    sizes = {}
    for option in (None, "int8", "int4:g32"):
        out = tmp_path / str(option).replace(":", "_")
        fxforge.aot_compile(model, (x,), str(out), **({"quantize": option} if option else {}))
        sizes[option] = (out / "weights.safetensors").stat().st_size
        loaded = fxforge.load(str(out))
        stored = load_file(str(out / "weights.safetensors"))
        dtypes = {t.dtype for t in stored.values()}
        with torch.no_grad():
            got = loaded(x)
        if option is not None:
            want = _dequantized_copy(model, {name: parse_quantize(option)[0][1]
                                             for name in ("up", "down", "head")})
            torch.testing.assert_close(got, want(x), rtol=1e-5, atol=1e-5)
            assert (torch.int8 if option == "int8" else torch.uint8) in dtypes
            assert torch.float16 in dtypes   # the scales
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert sizes[None] >= fp32_bytes
    assert sizes["int8"] < sizes[None] * 0.4 and sizes["int4:g32"] < sizes["int8"]


def test_a_group_that_does_not_divide_k_falls_back_to_one_that_does(caplog):
    gen = _generator()
    model = torch.nn.Sequential(torch.nn.Linear(96, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 96, generator=gen)
    with caplog.at_level("WARNING", logger="fxforge.passes.quantize"):
        compiled = fxforge.compile(model, (x,), quantize="int4:g64", backend="reference")
    text = caplog.text
    # one line for both linears, naming each with its K
    lines = [line for line in text.splitlines() if "not a multiple of 64" in line]
    assert len(lines) == 1 and "2 linear(s)" in lines[0] and "groups of 32" in lines[0], text
    assert "(96)" in lines[0] and "(32)" in lines[0]
    want = torch.nn.Sequential(torch.nn.Linear(96, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    want.load_state_dict(model.state_dict())
    for index, group in ((0, 32), (2, 32)):
        want[index].weight.data = _decode_nk(f"int4_g{group}",
                                             *quantize_int4(model[index].weight.data, group, "rtn"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want(x), rtol=1e-5, atol=1e-5)


def test_gguf_scheme_runs_the_files_blocks_bit_exactly(tmp_path, caplog):
    gguf = pytest.importorskip("gguf")
    gen = _generator()
    model = _MLP(gen).eval()
    q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for name, qtype in (("up", q.Q4_1), ("head", q.Q8_0)):   # "down" is not in the file
        values = getattr(model, name).weight.detach().numpy()
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file, writer.close):
        step()
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for tensor in reader.tensors:   # the model now holds the file's dequantized values
        decoded = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        getattr(model, tensor.name).weight.data = torch.from_numpy(decoded.copy())
    x = torch.randn(4, 64, generator=gen)
    with caplog.at_level("WARNING", logger="fxforge.passes.quantize"):
        compiled = fxforge.compile(model, (x,), quantize=f"gguf:{tmp_path / 'm.gguf'}")
    assert "stays fp32" in caplog.text   # "down": no tensor of the file holds it
    with torch.no_grad():   # the file's values exactly: only summation order differs
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    formats = {g.weight_format for g in _linears(compiled, x)}
    assert formats == {"int4_g32", "int8_g32", "dense"}


def _linears(compiled, x):
    from fxforge.compiler import recording
    from fxforge.irgraph.views import Linear
    torch._dynamo.reset()
    with recording() as graphs:
        compiled(x)
    return [lin for g in graphs for n in g.ir.gm.graph.nodes if (lin := Linear.of(n)) is not None]


def _correlated_inputs(gen: torch.Generator, rows: int, k: int) -> torch.Tensor:
    """Activations with few directions, like a model's: where GPTQ's error feedback pays."""
    return torch.randn(rows, 16, generator=gen) @ torch.randn(16, k, generator=gen) + \
        0.1 * torch.randn(rows, k, generator=gen)


@pytest.mark.parametrize("group", [32, 64, None])
def test_gptq_moves_the_outputs_less_than_round_to_nearest(group):
    from fxforge.passes.gptq import gptq_quantize
    gen = _generator()
    weight, x = _weights(48, 128, gen), _correlated_inputs(gen, 256, 128)
    fmt = f"int4_g{group}" if group else "int8_channel"
    rtn = quantize_int4(weight, group, "rtn") if group else quantize_int8_channel(weight, "rtn")
    gptq = gptq_quantize(weight, x.t() @ x, group)
    assert gptq[0].dtype == rtn[0].dtype and all(a.shape == b.shape for a, b in zip(gptq, rtn))

    def output_error(quantized):
        return float(((x @ _decode_nk(fmt, *quantized).t() - x @ weight.t()) ** 2).mean())
    assert output_error(gptq) < 0.5 * output_error(rtn)


def test_gptq_in_the_pass_calibrates_on_the_compiles_example():
    from fxforge.passes.gptq import gptq_quantize
    gen = _generator()
    model = _MLP(gen).eval()
    x = _correlated_inputs(gen, 32, 64)
    compiled = fxforge.compile(model, (x,), quantize="int4:g32:gptq", backend="reference")
    with torch.no_grad():   # the inputs each linear saw in the fp32 model: its Hessian
        seen = {"up": x, "down": torch.nn.functional.gelu(model.up(x))}
        seen["head"] = x + model.down(seen["down"])
        want = _MLP(torch.Generator().manual_seed(0))
        want.load_state_dict(model.state_dict())
        for name, inputs in seen.items():
            linear = getattr(want, name)
            codes = gptq_quantize(linear.weight.data, inputs.t() @ inputs, 32)
            linear.weight.data = _decode_nk("int4_g32", *codes)
        torch.testing.assert_close(compiled(x), want(x), rtol=1e-4, atol=1e-4)


def test_gptq_without_calibration_inputs_says_so_and_rounds_to_nearest(caplog):
    from fxforge.irgraph.capture import capture_export
    from fxforge.passes import PassManager
    from fxforge.passes.quantize import quantize_pass
    model = _MLP(_generator()).eval()
    ir = PassManager(["fuse_epilogues"]).run(capture_export(model, (torch.randn(2, 64),)))
    with caplog.at_level("WARNING", logger="fxforge.passes.quantize"):
        out = PassManager([quantize_pass(parse_quantize("int4:g32:gptq"))]).run(ir)
    assert "gptq rounding needs the compile's example inputs" in caplog.text
    assert out.info["passes"][-1].counts["int4_g32"] == 3


@pytest.mark.parametrize("fmt", ["int8_channel", "int4_g32"])
def test_a_quantized_linear_call_is_replayable(fmt):
    """A decode step is replayed without Python only if every op in it can be: a quantized
    linear once read dtypes through an ATen op and cost every quantized model its replay."""
    from fxforge.kernels.quant_linear_cpu import QuantLinear
    from fxforge.kernels.replay import Recording
    gen = _generator()
    weight = _weights(40, 64, gen)
    if fmt == "int8_channel":
        codes, scales = quantize_int8_channel(weight)
        tensors = (codes.t(), scales.t(), None)
    else:
        codes, scales, offsets = quantize_int4(weight, 32)
        tensors = (pack_nibbles(codes.t()), scales.t(), offsets.t())
    linear = QuantLinear(fmt, *tensors, torch.randn(40, generator=gen), "silu", True, None)
    x, residual = torch.randn(1, 64, generator=gen), torch.randn(1, 40, generator=gen)
    recording = Recording(lambda a, r: linear(a, r), [x, residual])
    x2, residual2 = torch.randn(1, 64, generator=gen), torch.randn(1, 40, generator=gen)
    torch.testing.assert_close(recording.replay([x2, residual2]), linear(x2, residual2),
                               rtol=0, atol=0)


def test_explain_lists_each_linears_format_bytes_and_names():
    model = _MLP(_generator()).eval()
    report = fxforge.explain(model, torch.randn(3, 64), count_eager=False,
                             quantize={"default": "int4:g32", "head": "int8"})
    rows = {line.split()[-1]: line.split() for line in report.text.splitlines()
            if line.startswith("  linear_") and line.split()[-1].endswith(".weight")}
    assert rows["up.weight"][1] == "int4_g32" and rows["up.weight"][2] == "64x128"
    # int4 g32: 64*128/2 code bytes + 2 groups x 128 x (fp16 scale + offset)
    assert int(rows["up.weight"][3]) == 64 * 128 // 2 + 2 * 128 * 4
    assert rows["head.weight"][1] == "int8_channel" and int(rows["head.weight"][3]) == 64 * 96 + 96 * 2
    assert "linear weights: 3," in report.text


def test_weights_changed_after_a_quantized_compile_are_a_clear_error():
    """Its codes hold the weights it froze: a changed weight would give stale answers, so the
    call raises, naming the weight and the way out; the model answers again once compiled with
    requantize_on_change (a new compile: dynamo keeps the old graph for the old options)."""
    gen = _generator()
    model = _MLP(gen).eval()
    x = torch.randn(3, 64, generator=gen)
    compiled = fxforge.compile(model, (x,), quantize="int8", backend="reference")
    with torch.no_grad():
        model.up.weight.mul_(1.5)   # in place, after compile
        for _ in range(2):          # stays an error: nothing was re-quantized behind the user
            with pytest.raises(fxforge.WeightsChangedError,
                               match=r"weight \d+ \(float32\[128, 64\]\) "
                                     r"was modified in place.*requantize_on_change=True"):
                compiled(x)
        again = fxforge.compile(model, (x,), quantize="int8", backend="reference",
                                requantize_on_change=True)
        want = _dequantized_copy(model, {name: "int8_channel:rtn"
                                         for name in ("up", "down", "head")})
        torch.testing.assert_close(again(x), want(x), rtol=1e-5, atol=1e-5)


def test_requantize_on_change_quantizes_a_changed_weight_again(caplog):
    """Opted in: a changed weight is re-frozen and re-quantized at its next call, with a warning."""
    gen = _generator()
    model = _MLP(gen).eval()
    x = torch.randn(3, 64, generator=gen)
    compiled = fxforge.compile(model, (x,), quantize="int8", backend="reference",
                               requantize_on_change=True)
    with torch.no_grad():
        compiled(x)
        model.up.weight.mul_(1.5)
        with caplog.at_level("WARNING", logger="fxforge"):
            got = compiled(x)
    assert "weights changed since compilation" in caplog.text
    assert "quantizing them again" in caplog.text
    want = _dequantized_copy(model, {name: "int8_channel:rtn" for name in ("up", "down", "head")})
    with torch.no_grad():
        torch.testing.assert_close(got, want(x), rtol=1e-5, atol=1e-5)


def test_requantize_on_change_is_a_boolean():
    with pytest.raises(fxforge.OptionsError, match="requantize_on_change must be True or False"):
        fxforge.compile(_MLP(_generator()), quantize="int8", requantize_on_change="yes")
