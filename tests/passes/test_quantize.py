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
    assert rules == (("layers.0.*", "none"), ("lm_head", "int8_channel:mse"), ("*", "int4_g64:mse"))
    assert parse_quantize(rules) == rules and parse_quantize([list(r) for r in rules]) == rules
    assert rule_for(rules, "layers.0.mlp.up_proj.weight") is None
    assert rule_for(rules, "lm_head.weight") == "int8_channel:mse"
    assert rule_for(rules, "layers.2.q.weight,layers.2.k.weight") == "int4_g64:mse"
    options = parse_options(quantize={"default": "int4:g32:rtn"})
    assert hash(options) == hash(parse_options(options.to_dict()))
    for bad in ("int3", "int4:g48", {"skip": ["x"]}, {"default": 4}):
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
    want = _dequantized_copy(model, {"up": "int4_g32:mse", "head": "int8_channel:rtn"})
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
