"""Building fused C++ kernels: compiler detection, failures, the on-disk cache, threads;
and the Triton kernel's tuning space."""
import re
import subprocess
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.irgraph import decomposition_table
from fxforge.kernels import cache_trust, fused_cpp, toolchain
from fxforge.kernels.fused import build_program, reference
from fxforge.kernels.fused_cpp import compile_fused_cpu, compile_program_cpu, generate_source
from fxforge.kernels.toolchain import KernelBuildError
from fxforge.kernels.fused_triton import TUNING_SPACE, default_config
from fxforge.testing import assert_close_to_eager


def softmax_group(scale: float):
    return make_fx(lambda x: torch.softmax(x * scale, -1), decomposition_table=decomposition_table(),
                   tracing_mode="symbolic")(torch.randn(3, 8))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path))
    return tmp_path / "kernels"


def test_a_failing_compiler_raises_kernel_build_error(cache, monkeypatch):
    monkeypatch.setenv("CXX", "false")        # exists, always fails
    with pytest.raises(KernelBuildError, match="failed"):
        compile_fused_cpu(softmax_group(1.5))
    assert not list(cache.glob("*.so"))


def test_no_compiler_raises_kernel_build_error(cache, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler"):
        compile_fused_cpu(softmax_group(1.5))


def recorded_library(target):
    """The library file that ``target``'s record (written when fxforge built it) names."""
    digest = cache_trust.digest_path(target).read_text().strip()
    return cache_trust.library_path(target, digest)


def test_cache_is_reused_and_a_corrupt_binary_is_rebuilt(cache, monkeypatch):
    program = build_program(softmax_group(0.75))
    source = generate_source(program, f"fused_{program.digest()}")
    target = toolchain.build_shared_object(source)
    library = recorded_library(target)
    assert toolchain.build_shared_object(source) == target          # a cache hit
    assert recorded_library(target) == library
    library.write_bytes(b"not an ELF file")                          # never loaded: safe
    kernel = compile_program_cpu(program)                            # check fails -> rebuild
    x = torch.randn(4, 9)
    assert_close_to_eager(kernel(x)[0], torch.softmax(x * 0.75, -1))
    assert recorded_library(target).read_bytes()[:4] == b"\x7fELF"
    assert not [p for p in cache.iterdir() if p.is_dir()], "temporary build dirs left behind"


def test_a_retry_loads_the_rebuilt_library_not_the_image_already_mapped(cache, tmp_path):
    """The cached library for a source lacks its symbol (a broken or older build, still ours):
    it is loaded, the lookup fails, the rebuild must be what the retry loads. dlopen of a path
    already loaded returns that image, so the rebuilt library needs a path of its own."""
    source = 'extern "C" int fxf_probe(void) { return 42; }\n'
    target = toolchain.build_shared_object(source, "probe")
    other = tmp_path / "other.cpp"
    other.write_text('extern "C" int fxf_other(void) { return 7; }\n')
    broken = tmp_path / "broken.so"
    subprocess.run([toolchain.find_compiler(), "-shared", "-fPIC", str(other), "-o", str(broken)],
                   check=True, capture_output=True, timeout=120)
    cache_trust.install_library(broken, target)
    assert cache_trust.load_library(target).fxf_other() == 7   # mapped now, under its path
    assert toolchain.load_function(source, "fxf_probe", "probe")() == 42


def test_no_trustworthy_cache_folder_is_a_kernel_build_error(cache, tmp_path, monkeypatch):
    """Neither the cache (writable by others) nor a private temporary folder (made where others
    can rename it) may be used: the build fails as builds fail, so the group runs on ATen."""
    cache.parent.chmod(0o777)
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir(mode=0o777)
    shared_tmp.chmod(0o777)   # no sticky bit
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    cache_trust.reset()
    try:
        with pytest.raises(KernelBuildError, match="no trustworthy cache folder"):
            compile_fused_cpu(softmax_group(1.75))
    finally:
        cache_trust.reset()


def test_extra_compiler_flags_from_the_environment_reach_the_build_and_its_cache_key(cache,
                                                                                    monkeypatch):
    """FXFORGE_CXXFLAGS (e.g. a sanitizer for a checking run) is passed to every build and keys
    the cache: a library built without it is not reused with it, nor the other way round."""
    source = ('#ifndef FXF_CHECKED_BUILD\n#error "built without FXFORGE_CXXFLAGS"\n#endif\n'
              'extern "C" int fxf_checked(void) { return FXF_CHECKED_BUILD; }\n')
    monkeypatch.delenv(toolchain.EXTRA_FLAGS_ENV, raising=False)
    with pytest.raises(KernelBuildError, match="built without FXFORGE_CXXFLAGS"):
        toolchain.build_shared_object(source, "checked")
    monkeypatch.setenv(toolchain.EXTRA_FLAGS_ENV, "-DFXF_CHECKED_BUILD=7 -Wall")
    assert toolchain.load_function(source, "fxf_checked", "checked")() == 7
    plain = toolchain.build_shared_object("extern \"C\" int f(void) { return 1; }\n", "plain")
    monkeypatch.setenv(toolchain.EXTRA_FLAGS_ENV, "")
    assert toolchain.build_shared_object("extern \"C\" int f(void) { return 1; }\n",
                                         "plain") != plain


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_rows_match_eager(cache, threads):
    gm = make_fx(lambda x, r, w: (F.layer_norm(x + r, (1024,), w, None), torch.softmax(x, -1)),
                 decomposition_table=decomposition_table())(
        torch.randn(2, 1024), torch.randn(2, 1024), torch.randn(1024))
    inputs = (torch.randn(64, 1024), torch.randn(64, 1024), torch.randn(1024))
    kernel = compile_fused_cpu(gm)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel(*inputs)
    finally:
        torch.set_num_threads(before)
    assert_close_to_eager(list(got), list(reference(gm, *inputs)))


def test_triton_tuning_space_prunes_with_reasons():
    problem = {"rows": 4, "N": 40}
    kept, pruned = TUNING_SPACE.survivors(problem)
    assert kept and pruned
    assert all(c["BLOCK_N"] <= 128 and c["BLOCK_R"] <= 4 for c in kept)
    assert any("wider than the row" in reason for reason in pruned.values())
    whole_row = default_config(rows=4, ncols=40)
    assert whole_row["BLOCK_N"] >= 40 and TUNING_SPACE.prune(whole_row, problem) is None


def test_row_loops_vectorize_with_256_bit_vectors(tmp_path):
    """Every loop over the row (reductions included) of a GELU/SiLU/softmax/LayerNorm kernel is
    vectorized with 32-byte vectors: the math is branch-free, the reductions are `omp simd`."""
    gm = make_fx(lambda x, r, w: (F.gelu(x), F.silu(x) * torch.tanh(r), torch.softmax(x, -1),
                                  F.layer_norm(x + r, (64,), w, None)),
                 decomposition_table=decomposition_table())(
        torch.randn(2, 64), torch.randn(2, 64), torch.randn(64))
    source = generate_source(build_program(gm), "vec_check")
    src = tmp_path / "kernel.cpp"
    src.write_text(source)
    flags = [f for f in toolchain.FLAGS if f != "-shared"]
    done = subprocess.run([toolchain.find_compiler(), *flags, "-c", str(src), "-o",
                           str(tmp_path / "kernel.o"), "-fopt-info-vec-optimized"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loops = {n + 1 for n, line in enumerate(source.splitlines()) if "for (int64_t j = 0" in line}
    wide = {int(m) for m in re.findall(r"kernel\.cpp:(\d+):\d+: optimized: loop vectorized "
                                       r"using 32 byte vectors", done.stderr)}
    missed = [n for n in loops if not wide & {n - 1, n, n + 1}]   # GCC names a nearby line
    assert loops and not missed, f"row loops not 256-bit vectorized at lines {missed}"


def test_small_work_runs_on_one_thread(cache, monkeypatch):
    """The thread count a launch passes the kernel: 1 for a small input, torch's for a big one."""
    gm = make_fx(lambda x: torch.softmax(x, -1), decomposition_table=decomposition_table())(
        torch.randn(2, 8))
    kernel = compile_fused_cpu(gm)
    threads, real_launch = [], fused_cpp.launch

    def launch(fn, args, keep=None):
        threads.append(args[1])   # the kernel's thread count
        return real_launch(fn, args, keep)
    monkeypatch.setattr(fused_cpp, "launch", launch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernel(torch.randn(4, 8))
        kernel(torch.randn(512, 1024))
    finally:
        torch.set_num_threads(before)
    assert threads == [1, 2]
