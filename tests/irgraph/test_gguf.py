"""GGUF blocks (irgraph/gguf.py): a GGUF file's Q8_0/Q4_0/Q4_1 blocks found for the fp32
weights transformers dequantizes from it, as fxforge weight formats, bit-exact.

Tiny files are written with gguf-py's own writer and quantizer from random weights (torch's RNG,
seeded freshly per test by conftest), so the expected values are gguf-py's dequantization, not
this module's."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fxforge.irgraph.gguf import GGUFBlocks, GGUFError, open_blocks  # noqa: E402
from fxforge.irgraph.weight_format import FORMATS, decode  # noqa: E402

Q = gguf.GGMLQuantizationType
# name -> (GGUF type, [N, K]); Q4_0 and Q4_1 share a shape so a find must pick by content
TENSORS = {"w.q8_0": (Q.Q8_0, (48, 64)), "w.q4_0": (Q.Q4_0, (40, 96)),
           "w.q4_1": (Q.Q4_1, (40, 96))}
EXPECTED_FORMAT = {Q.Q8_0: "int8_g32", Q.Q4_0: "int4_g32", Q.Q4_1: "int4_g32"}


def _write(path, tensors: dict) -> None:
    """A GGUF file holding ``tensors`` (name -> ([N, K] fp32 numpy, GGUF type))."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (values, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, values.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_file(tmp_path):
    """(path, {name: the file's dequantized [N, K] fp32 values as gguf-py decodes them})."""
    tensors = {name: (torch.randn(shape).numpy() * 0.05, qtype)
               for name, (qtype, shape) in TENSORS.items()}
    tensors["norm"] = (torch.rand(64).numpy(), Q.F32)          # not mappable: other types
    tensors["w.f16"] = (torch.randn(8, 64).numpy(), Q.F16)
    path = tmp_path / "tiny.gguf"
    _write(path, tensors)
    reader = gguf.GGUFReader(str(path))
    values = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
              for t in reader.tensors if t.name in TENSORS}
    for name, (qtype, shape) in TENSORS.items():
        assert list(values[name].shape) == list(shape), name   # gguf-py's [N, K] row layout
    return path, values


def _check(mapping, weight_nk: torch.Tensor, qtype) -> None:
    assert mapping is not None, "no mapping found"
    fmt, codes, scales, offsets = mapping
    assert fmt == EXPECTED_FORMAT[qtype]
    FORMATS[fmt].check_extras(codes, (scales, offsets))      # dtypes and [rows, N] shapes
    assert FORMATS[fmt].in_features(codes) == weight_nk.shape[1]
    assert codes.shape[1] == weight_nk.shape[0]
    assert (offsets is None) == (fmt == "int8_g32")
    assert torch.equal(decode(codes, fmt, scales, offsets), weight_nk.t())


@pytest.mark.parametrize("name", list(TENSORS))
def test_find_maps_each_block_type_bit_exactly_in_file_order_and_permuted(gguf_file, name):
    path, values = gguf_file
    blocks = GGUFBlocks.open(path)
    qtype = TENSORS[name][0]
    weight = values[name]
    if qtype == Q.Q4_0:   # (q - 8) d with d < 0 gives -0.0, which fxforge's q d + (-8 d) makes +0.0
        assert bool(((weight == 0) & weight.signbit()).any()), "no -0.0 to exercise"
    _check(blocks.find(weight), weight, qtype)
    perm = torch.randperm(weight.shape[0])
    _check(blocks.find(weight[perm]), weight[perm], qtype)
    # a transposed (non-contiguous) view of the same values, as a linear's weight may be
    _check(blocks.find(weight.t().contiguous().t()), weight, qtype)


def test_a_fused_projection_maps_rows_from_several_tensors(gguf_file, tmp_path):
    """fxforge fuses q/k/v (gate/up) into one weight: its rows come from several file tensors."""
    path, values = gguf_file
    fused = torch.cat([values["w.q4_1"][5:], values["w.q4_0"], values["w.q4_1"][:5]])
    mapping = GGUFBlocks.open(path).find(fused)
    assert mapping is not None and mapping[0] == "int4_g32"
    assert torch.equal(decode(*mapping[1:2], mapping[0], *mapping[2:]), fused.t())
    mixed = tmp_path / "mixed.gguf"   # Q8_0 rows beside Q4 rows: no one format holds both
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    a, b = (torch.randn(8, 64, generator=gen).numpy() * 0.05 for _ in range(2))
    _write(mixed, {"a": (a, Q.Q8_0), "b": (b, Q.Q4_1)})
    reader = gguf.GGUFReader(str(mixed))
    decoded = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
               for t in reader.tensors}
    assert GGUFBlocks.open(mixed).find(torch.cat([decoded["a"], decoded["b"]])) is None
    assert GGUFBlocks.open(mixed).find(decoded["b"]) is not None


def test_q8_0_codes_and_scales_are_the_files_own_bytes(gguf_file):
    path, values = gguf_file
    raw = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "w.q8_0").data
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, 34)
    fmt, codes, scales, _ = GGUFBlocks.open(path).find(values["w.q8_0"])
    file_codes = blocks[:, :, 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
    file_scales = blocks[:, :, :2].copy().view(np.float16).reshape(raw.shape[0], -1)
    assert torch.equal(codes.t(), torch.from_numpy(file_codes))
    assert torch.equal(scales.t(), torch.from_numpy(file_scales))


@pytest.mark.parametrize("name", list(TENSORS))
def test_find_gives_none_for_one_value_one_ulp_off_or_a_shape_not_in_the_file(gguf_file, name):
    path, values = gguf_file
    blocks = GGUFBlocks.open(path)
    weight = values[name]
    n, k = weight.shape
    off = weight.clone()
    i, j = int(torch.randint(n, ())), int(torch.randint(k, ()))
    off.view(torch.int32)[i, j] += 1                      # the next fp32 up (or down if < 0)
    assert off[i, j] != weight[i, j]
    assert blocks.find(off) is None
    assert blocks.find(weight[:, :32].contiguous()) is None   # [N, 32]: no such tensor
    half = weight[: n // 2]   # rows the file holds, fewer of them: found row by row
    _check(blocks.find(half), half, TENSORS[name][0])
    assert blocks.find(weight.double()) is None            # not the fp32 the file decodes to
    assert blocks.find(torch.zeros(8, 64)) is None         # the F16 tensor's shape: not mapped


def test_a_digest_collision_gives_none_never_wrong_values(gguf_file, monkeypatch):
    """Rows are matched by digest; the decoded result is still compared with the weight."""
    import fxforge.irgraph.gguf as module
    path, values = gguf_file
    monkeypatch.setattr(module, "_row_digests", lambda v: [b"same"] * v.shape[0])
    blocks = GGUFBlocks.open(path)
    for name in TENSORS:   # every row "matches" file row 0; the check sees it is not so
        assert blocks.find(values[name]) is None, name


def test_summary_counts_types_and_what_is_mappable(gguf_file):
    path, values = gguf_file
    blocks = GGUFBlocks.open(path)
    summary = blocks.summary()
    assert summary["types"] == {"Q8_0": 1, "Q4_0": 1, "Q4_1": 1, "F32": 1, "F16": 1}
    assert summary["tensors"] == 5 and summary["mappable"] == 3
    assert summary["not_mappable"] == {"type F32": 1, "type F16": 1}
    assert summary["indexed"] == 0
    blocks.find(values["w.q8_0"])
    assert blocks.summary()["indexed"] == 1   # decoded lazily, only the candidates of that shape


def test_open_blocks_caches_per_file_and_rereads_a_rewritten_one(gguf_file, tmp_path):
    path, _ = gguf_file
    first = open_blocks(path)
    assert open_blocks(str(path)) is first
    link = tmp_path / "link.gguf"
    link.symlink_to(path)
    assert open_blocks(link) is first                      # keyed by the real path
    _write(path, {"w.q8_0": (torch.randn(16, 32).numpy(), Q.Q8_0)})
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a new mtime, surely
    second = open_blocks(path)
    assert second is not first and second.summary()["tensors"] == 1


def test_bad_files_raise_gguf_error_naming_the_path(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(GGUFError, match="missing.gguf.*cannot be read"):
        GGUFBlocks.open(missing)
    with pytest.raises(GGUFError, match="missing.gguf"):
        open_blocks(missing)
    text = tmp_path / "notes.txt"
    text.write_text("these are not tensors\n")
    with pytest.raises(GGUFError, match="notes.txt.*is not a GGUF file"):
        GGUFBlocks.open(text)
    with pytest.raises(GGUFError, match=f"{tmp_path.name}.*cannot be read"):
        GGUFBlocks.open(tmp_path)                          # a folder
    truncated = tmp_path / "truncated.gguf"
    _write(truncated, {"w": (torch.randn(16, 32).numpy(), Q.Q8_0)})
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(GGUFError, match="truncated.gguf.*cannot be parsed"):
        GGUFBlocks.open(truncated)


@pytest.mark.models
@pytest.mark.slow
def test_every_linear_of_the_real_smollm2_maps_to_its_file_blocks():
    """The real SmolLM2-135M (Q4_1 linears, a Q8_0 tied embedding / LM head): every nn.Linear
    of the model transformers loads from the file maps back to the file's blocks, bit-exact."""
    from fxforge.examples.smollm2 import _gguf_location, load_smollm2, smollm2_status

    ok, reason = smollm2_status()
    if not ok:
        pytest.skip(reason)
    model, _ = load_smollm2(progress=False)
    folder, name = _gguf_location()
    start = time.perf_counter()
    blocks = open_blocks(folder / name)
    formats: dict[str, int] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1
    for module_name, linear in linears:
        weight = linear.weight.detach()
        mapping = blocks.find(weight)
        assert mapping is not None, f"{module_name}: no blocks found"
        fmt, codes, scales, offsets = mapping
        assert torch.equal(decode(codes, fmt, scales, offsets), weight.t()), module_name
        formats[fmt] = formats.get(fmt, 0) + 1
    elapsed = time.perf_counter() - start
    assert formats == {"int4_g32": 210, "int8_g32": 1}, formats
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    print(f"\nSmolLM2: {len(linears)} linears mapped {formats} in {elapsed:.1f} s; "
          f"{blocks.summary()}")
