"""CPU ISA detection and the matmul-path dispatch built on it."""
import itertools

import pytest
import torch

from fxforge.kernels import cpu_isa
from fxforge.kernels.cpu_isa import (ISA_ENV, MATMUL_PATHS, CPUFeatures, apply_isa_override,
                                     choose_matmul_path, cpu_features, detect_hardware)

FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
         "avx2", "fma")
INT8_TYPES = (torch.int8, torch.uint8, torch.qint8)


def _every_feature_combination():
    for bits in itertools.product((False, True), repeat=len(FLAGS)):
        yield CPUFeatures(**dict(zip(FLAGS, bits)), cpu_name="test", cores=2)


def _expected_bf16(f: CPUFeatures) -> str:
    return "amx_bf16" if f.amx_tile and f.amx_bf16 else "avx512_bf16" if f.avx512_bf16 else "fp32"


def _expected_int8(f: CPUFeatures) -> str:
    return "amx_int8" if f.amx_tile and f.amx_int8 else "avx512_vnni" if f.avx512_vnni else "fp32"


def test_dispatch_for_every_feature_combination():
    for features in _every_feature_combination():
        bf16 = choose_matmul_path(torch.bfloat16, features)
        assert bf16.name == _expected_bf16(features), features
        assert bf16.compute_dtype == (torch.float32 if bf16.name == "fp32" else torch.bfloat16)
        for dtype in INT8_TYPES:
            int8 = choose_matmul_path(dtype, features)
            assert int8.name == _expected_int8(features), (dtype, features)
            assert int8.compute_dtype == (torch.float32 if int8.name == "fp32" else torch.int8)
        for dtype in (torch.float32, torch.float16):
            path = choose_matmul_path(dtype, features)
            assert (path.name, path.compute_dtype) == ("fp32", torch.float32)
        for path in (bf16, int8):
            assert path.name in MATMUL_PATHS and path.reason


def test_reasons_say_why():
    avx2_only = CPUFeatures(avx2=True, fma=True)
    assert choose_matmul_path(torch.bfloat16, avx2_only).reason == (
        "bf16 requested but this CPU has neither AMX-BF16 nor AVX512-BF16: fp32")
    assert "AVX512-VNNI" in choose_matmul_path(torch.int8, avx2_only).reason
    assert "AMX" in choose_matmul_path(torch.bfloat16, CPUFeatures(amx_tile=True, amx_bf16=True)).reason


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="float64"):
        choose_matmul_path(torch.float64, CPUFeatures())


def test_env_override_selects_the_named_isa(monkeypatch):
    hardware = detect_hardware()
    for spec, expected_bf16, expected_int8 in (("amx", "amx_bf16", "amx_int8"),
                                               ("avx512_bf16", "avx512_bf16", "avx512_vnni"),
                                               ("avx512_vnni", "fp32", "avx512_vnni"),
                                               ("avx2", "fp32", "fp32"),
                                               ("avx2,amx_tile,amx_bf16", "amx_bf16", "fp32")):
        monkeypatch.setenv(ISA_ENV, spec)
        features = cpu_features()
        assert choose_matmul_path(torch.bfloat16, features).name == expected_bf16, spec
        assert choose_matmul_path(torch.int8).name == expected_int8, spec  # reads the env itself
        assert features.cores == hardware.cores and spec in features.cpu_name
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert cpu_features().isa_flags() == ("avx2", "fma")


def test_env_override_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match="avx9000"):
        cpu_features()


def test_without_override_it_is_the_hardware(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    assert cpu_features() == detect_hardware()
    assert apply_isa_override(detect_hardware(), "none").isa_flags() == ()


def test_capabilities_and_cpuinfo_agree_on_this_cpu(monkeypatch):
    if not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch has no torch.cpu.get_capabilities")
    from_torch = detect_hardware()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    from_cpuinfo = detect_hardware()
    assert from_torch.isa_flags() == from_cpuinfo.isa_flags()
    assert from_cpuinfo.cpu_name != "unknown"


FAKE_CPUINFO = """processor\t: 0
model name\t: Test Xeon with AMX
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Test Xeon with AMX
flags\t\t: fpu sse2
"""


def test_fallback_to_cpuinfo_when_get_capabilities_is_missing(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FAKE_CPUINFO)
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    features = detect_hardware(str(cpuinfo))
    assert features.cpu_name == "Test Xeon with AMX"
    assert features.isa_flags() == ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16",
                                     "avx512_vnni", "avx2", "fma")
    assert choose_matmul_path(torch.bfloat16, features).name == "amx_bf16"


def test_fallback_when_get_capabilities_raises(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name : Old Box\nflags : sse2 avx2\n")

    def broken():
        raise RuntimeError("no cpuinfo library")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    features = detect_hardware(str(cpuinfo))
    assert features.isa_flags() == ("avx2",) and features.cpu_name == "Old Box"
    assert detect_hardware(str(tmp_path / "missing")).isa_flags() == ()


def test_capabilities_keys_are_read(monkeypatch):
    capabilities = {"amx_tile": True, "amx_bf16": True, "avx512_f": True, "fma3": True,
                    "cpu_name": "Fake", "num_physical_cores": 56}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    features = detect_hardware()
    assert features.isa_flags() == ("amx_tile", "amx_bf16", "avx512f", "fma")
    assert (features.cpu_name, features.cores) == ("Fake", 56)
    assert "56 cores" in features.describe()


def test_hardware_is_detected_once(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    cpu_isa.hardware.cache_clear()
    calls = []
    monkeypatch.setattr(cpu_isa, "detect_hardware", lambda: calls.append(1) or CPUFeatures(avx2=True))
    assert cpu_features() is cpu_features()
    assert len(calls) == 1
    cpu_isa.hardware.cache_clear()
