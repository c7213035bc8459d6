"""The quantized weight-only GEMV (kernels/quant_gemv_cpu.py) on every format x every ISA variant
this machine's hardware has, against the reference ``act(x @ dequantize(...).T + bias) + res``."""
import os

import pytest
import torch

from fxforge.kernels import cpu_isa, quant_gemv_cpu, toolchain
from fxforge.kernels.activations import ACTIVATION_CODES, REGISTRY
from fxforge.kernels.gemv_cpu import GEMV_MAX_M, PARALLEL_MIN_WEIGHTS
from fxforge.kernels.quant_gemv_cpu import QUANT_FORMATS, QuantGemv, dequantize, quant_format
from fxforge.testing import assert_close_to_sum as _assert_close

pytestmark = pytest.mark.skipif(quant_gemv_cpu.quant_gemv_unavailable() is not None,
                                reason="no C++ compiler for the quantized GEMV")

ISA_ENV_OF = {"portable": "none", "avx2": "avx2", "avx512": "avx512"}
MACRO_LEVEL = {"portable": 0, "avx2": 1, "avx512": 2}   # what fxf_qgemv_isa reports


def _hardware_has(variant: str) -> bool:
    hw = cpu_isa.hardware()
    return {"portable": True, "avx2": hw.avx2 and hw.fma,
            "avx512": hw.avx512f and quant_gemv_cpu._avx512_bw_vl_dq()}[variant]


@pytest.fixture(params=quant_gemv_cpu.ISA_VARIANTS)
def variant(request, monkeypatch):
    if not _hardware_has(request.param):
        pytest.skip(f"this CPU lacks {request.param} ({cpu_isa.hardware().describe()})")
    monkeypatch.setenv(cpu_isa.ISA_ENV, ISA_ENV_OF[request.param])
    return request.param


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _weight(fmt: str, n: int, k: int, gen: torch.Generator):
    """Random codes over their whole range, fp16 scales of both signs, fp16 offsets."""
    f = quant_format(fmt)
    groups = k // (f.group or k)
    if f.int4:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    else:
        codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.randn(n, groups, generator=gen) * 0.05).half()
    offsets = (torch.randn(n, groups, generator=gen) * 0.3).half() if f.int4 else None
    return codes, scales, offsets


def _reference(fmt, codes, scales, offsets, x, bias, activation, residual):
    y = x @ dequantize(fmt, codes, scales, offsets).T
    if bias is not None:
        y = y + bias
    y = REGISTRY[ACTIVATION_CODES[activation]].aten_(y.clone())
    return y + residual if residual is not None else y


def _paths(kernel: QuantGemv, m: int):
    """Run the caller's check on every path a call of M rows may take: above GEMV_MAX_M both
    the GEMV tiles and the dequantizing GEMM, whichever GEMM_MIN_M picks for the variant."""
    chosen = kernel.gemm_min_m
    for gemm_min_m, path in ((None, "gemv"), (GEMV_MAX_M + 1, "gemm")):
        if m > GEMV_MAX_M or gemm_min_m is None:
            kernel.gemm_min_m = gemm_min_m
            yield path
    kernel.gemm_min_m = chosen


def _group(fmt: str) -> int:
    return quant_format(fmt).group or 32


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("n", [1, 7, 33, 100])
@pytest.mark.parametrize("groups", [1, 2, 5])
def test_every_format_and_variant_matches_the_reference(fmt, n, groups, variant):
    k = _group(fmt) * groups + (3 if fmt == "int8_channel" else 0)   # K off the unroll too
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    codes, scales, offsets = _weight(fmt, n, k, gen)
    mag_w = dequantize(fmt, codes, scales.abs(), offsets.abs() if offsets is not None else None).abs()
    for activation in sorted(ACTIVATION_CODES):
        for with_bias in (False, True):
            bias = torch.randn(n, generator=gen) if with_bias else None
            kernel = QuantGemv(fmt, codes, scales, offsets, bias, activation)
            assert kernel.isa == variant and variant in kernel.describe()
            for m, with_res in ((1, False), (3, True), (GEMV_MAX_M, False), (9, True), (1, True)):
                x = torch.randn(m, k, generator=gen)
                res = torch.randn(m, n, generator=gen) if with_res else None
                ref = _reference(fmt, codes, scales, offsets, x, bias, activation, res)
                for path in _paths(kernel, m):
                    _assert_close(kernel(x, res), ref, x.abs() @ mag_w.T, res,
                                  f"{fmt} {variant} {path} seed={seed} M={m} N={n} K={k} "
                                  f"{activation} bias={with_bias} residual={with_res}")


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_size_and_strided_inputs(fmt, threads, variant):
    n, k = 333, 256                                   # N * K above the threading threshold
    assert n * k >= PARALLEL_MIN_WEIGHTS
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    codes, scales, offsets = _weight(fmt, n, k, gen)
    mag_w = dequantize(fmt, codes, scales.abs(), offsets.abs() if offsets is not None else None).abs()
    kernel = QuantGemv(fmt, codes, scales, offsets, torch.randn(n, generator=gen), "gelu")
    for m in (1, 2, 4, 16):
        x = torch.randn(m, k + 40, generator=gen)[:, 20:20 + k]          # row stride K + 40
        res = torch.randn(m, 2 * n, generator=gen)[:, ::2]                # strided along N
        ref = _reference(fmt, codes, scales, offsets, x, kernel.bias, "gelu", res)
        for path in _paths(kernel, m):
            _assert_close(kernel(x, res, threads=threads), ref, x.abs() @ mag_w.T, res,
                          f"{fmt} {variant} {path} seed={seed} M={m} T={threads}")


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("kc,mc", [(1024, 240), (48, 30), (2, 7)])
def test_the_dequantizing_gemm_in_k_chunks_and_row_blocks(fmt, kc, mc, variant):
    """The GEMM path with K chunks that end inside a group and row blocks off the 6-row tiles
    and 24-row strips (each thread dequantizes the chunk it multiplies): a last panel that is
    partial, the bias, output and residual columns of each panel, one and two threads."""
    n, k = 16 * 5 + 9, 2 * _group(fmt) + (5 if fmt == "int8_channel" else 0)
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    codes, scales, offsets = _weight(fmt, n, k, gen)
    mag_w = dequantize(fmt, codes, scales.abs(), offsets.abs() if offsets is not None else None).abs()
    kernel = QuantGemv(fmt, codes, scales, offsets, torch.randn(n, generator=gen), "silu")
    kernel.kc, kernel.mc, kernel.gemm_min_m = kc, mc, GEMV_MAX_M + 1
    for m, threads in ((GEMV_MAX_M + 1, 1), (31, 2), (53, 2)):
        x = torch.randn(m, k, generator=gen)
        res = torch.randn(m, n, generator=gen)
        ref = _reference(fmt, codes, scales, offsets, x, kernel.bias, "silu", res)
        _assert_close(kernel(x, res, threads=threads), ref, x.abs() @ mag_w.T, res,
                      f"{fmt} {variant} kc={kc} mc={mc} seed={seed} M={m} T={threads}")


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_nan_and_inf_inputs_propagate_like_the_reference(fmt, activation, variant):
    """x rows with a NaN, a +inf, a -inf, +inf and -inf together, and a finite row. An inf
    times a weight gives +-inf (NaN where the weight is 0), so an output is inf, not NaN, in
    most places: the int4 kernel's s * sum(q x) + o * sum(x) would give NaN where s and o have
    opposite signs; it must take the reference's form for such rows."""
    n, k = 45, 2 * _group(fmt)
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    codes, scales, offsets = _weight(fmt, n, k, gen)
    kernel = QuantGemv(fmt, codes, scales, offsets, torch.randn(n, generator=gen), activation)
    x = torch.randn(5, k, generator=gen)
    x[0, 3] = float("nan")
    x[1, k - 1] = float("inf")
    x[2, 5] = float("-inf")
    x[3, 0], x[3, k // 2] = float("inf"), float("-inf")
    for rows, path in ((r, p) for r in (x[:4], x, torch.cat([x, x]))
                       for p in _paths(kernel, r.shape[0])):
        got = kernel(rows, None)
        ref = _reference(fmt, codes, scales, offsets, rows, kernel.bias, activation, None)
        what = f"{fmt} {variant} {path} seed={seed} M={rows.shape[0]}"
        assert torch.equal(got.isnan(), ref.isnan()), what
        assert torch.equal(got.isinf(), ref.isinf()) and torch.equal(got[ref.isinf()],
                                                                      ref[ref.isinf()]), what
        assert ref.isinf().sum() >= n // 4 and ref[4:5].isfinite().all()    # the case is exercised
        finite = ref.isfinite()
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-4, atol=1e-3, msg=what)


@pytest.mark.parametrize("variant_name", quant_gemv_cpu.ISA_VARIANTS)
def test_each_variant_is_the_build_it_claims(variant_name):
    """The library of a variant compiled the matching #if block (the kernel reports it), and
    the avx2 flags give no AVX-512 (a probe built with the same toolchain flags)."""
    if not _hardware_has(variant_name):
        pytest.skip(f"this CPU lacks {variant_name}")
    assert quant_gemv_cpu.entries(variant_name)[2]() == MACRO_LEVEL[variant_name]
    probe = ('extern "C" int fxf_probe(void) { int r = 0;\n#ifdef __AVX512F__\nr |= 1;\n#endif\n'
             '#ifdef __AVX2__\nr |= 2;\n#endif\n#ifdef __F16C__\nr |= 4;\n#endif\nreturn r; }\n')
    expected = {"portable": 0, "avx2": 6, "avx512": 7}[variant_name]
    assert toolchain.load_function(probe, "fxf_probe", "isa_probe", isa=variant_name)() == expected


def test_toolchain_isa_flags():
    base = toolchain.compile_flags()
    assert "-march=native" in base and base == toolchain.compile_flags(None)
    for isa, march in toolchain.ISA_MARCH.items():
        flags = toolchain.compile_flags(isa)
        assert march in flags and not any(f.startswith("-march=") and f != march for f in flags)
        assert [f for f in flags if f != march] == [f for f in base if f != "-march=native"]
    with pytest.raises(ValueError, match="avx9"):
        toolchain.compile_flags("avx9")


def test_the_override_selects_lower_variants_and_never_above_the_hardware(monkeypatch):
    monkeypatch.setenv(cpu_isa.ISA_ENV, "none")
    assert quant_gemv_cpu.choose_isa() == "portable"
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx2")
    assert quant_gemv_cpu.choose_isa() == ("avx2" if _hardware_has("avx2") else "portable")
    monkeypatch.setattr(cpu_isa, "hardware", lambda: cpu_isa.CPUFeatures(avx2=True, fma=True))
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx512_bf16")        # asks for more than it has
    assert quant_gemv_cpu.choose_isa() == "avx2"
    monkeypatch.delenv(cpu_isa.ISA_ENV)
    assert quant_gemv_cpu.choose_isa() == "avx2"
    monkeypatch.setattr(cpu_isa, "hardware", lambda: cpu_isa.CPUFeatures())
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx2")
    assert quant_gemv_cpu.choose_isa() == "portable"


def test_one_pack_per_content():
    gen = torch.Generator().manual_seed(_seed())
    codes, scales, offsets = _weight("int4_g32", 40, 64, gen)
    a = QuantGemv("int4_g32", codes, scales, offsets, None, "none")
    b = QuantGemv("int4_g32", codes.clone(), scales.clone(), offsets.clone(), None, "silu")
    assert a.weight is b.weight
    c = QuantGemv("int4_g64", codes, scales[:, :1].contiguous(), offsets[:, :1].contiguous(),
                  None, "none")
    assert c.weight is not a.weight


def test_clear_errors():
    gen = torch.Generator().manual_seed(1)
    codes, scales, offsets = _weight("int4_g32", 8, 64, gen)
    with pytest.raises(ValueError, match="'int3_g32'"):
        QuantGemv("int3_g32", codes, scales, offsets, None, "none")
    with pytest.raises(ValueError, match="K=96 .* G=64"):
        QuantGemv("int4_g64", torch.zeros(8, 48, dtype=torch.uint8), scales, offsets, None, "none")
    with pytest.raises(ValueError, match="K=96 .* G=64"):
        dequantize("int4_g64", torch.zeros(8, 48, dtype=torch.uint8), scales, offsets)
    with pytest.raises(ValueError, match="codes must be .*uint8"):
        QuantGemv("int4_g32", codes.to(torch.int8), scales, offsets, None, "none")
    with pytest.raises(ValueError, match="scales must be torch.float16 \\[8, 2\\]"):
        QuantGemv("int4_g32", codes, scales.float(), offsets, None, "none")
    with pytest.raises(ValueError, match="scales must be .*got torch.float16 \\[8, 1\\]"):
        QuantGemv("int4_g32", codes, scales[:, :1], offsets, None, "none")
    with pytest.raises(ValueError, match="offsets must be"):
        QuantGemv("int4_g32", codes, scales, None, None, "none")
    i8, s8, _ = _weight("int8_channel", 8, 64, gen)
    with pytest.raises(ValueError, match="has no offsets"):
        QuantGemv("int8_channel", i8, s8, s8, None, "none")
    with pytest.raises(ValueError, match="codes must be .*int8"):
        QuantGemv("int8_channel", i8.to(torch.uint8), s8, None, None, "none")
    with pytest.raises(ValueError, match="bias must be"):
        QuantGemv("int8_channel", i8, s8, None, torch.zeros(9), "none")
    with pytest.raises(ValueError, match="unknown activation"):
        QuantGemv("int8_channel", i8, s8, None, None, "swish2")
    kernel = QuantGemv("int4_g32", codes, scales, offsets, None, "none")
    kernel.kc, kernel.gemm_min_m = 1 << 40, GEMV_MAX_M + 1   # a 64 TiB buffer: no allocation
    with pytest.raises(MemoryError, match="GEMM could not allocate"):
        kernel(torch.zeros(GEMV_MAX_M + 1, 64), None)
    kernel = QuantGemv("int4_g32", codes, scales, offsets, None, "none")
    with pytest.raises(ValueError, match="K=64"):
        kernel(torch.zeros(1, 63), None)
    with pytest.raises(ValueError, match="x must be fp32"):
        kernel(torch.zeros(1, 64, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="residual must be"):
        kernel(torch.zeros(2, 64), torch.zeros(2, 7))
