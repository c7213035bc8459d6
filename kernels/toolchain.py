"""The C++ toolchain every CPU kernel builds with, and the kernel cache folder.

The fused row programs (``fused_cpp.py``), the GEMM, the GEMV and the attention kernels all
hand their generated source to :func:`load_function`: one compiler (``$CXX``, else g++, else
clang++), one flag set, one cache. A library is named by the SHA-256 of its source, the
compiler's identity and the flags, built in ``<cache root>/kernels`` and loaded only after the
checks of ``kernels/cache_trust.py``. Imports no other kernel module but that one.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

from fxforge.errors import FxforgeError
from fxforge.irgraph.compile_profile import phase
from fxforge.kernels.cache_trust import digest_path, install_library, load_library, trusted_dir, write_atomic

FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=256", "-fno-trapping-math", "-fno-math-errno",
         "-fopenmp", "-shared", "-fPIC", "-std=gnu++17")
# Extra compiler flags for every kernel build, from the environment (they enter the cache key):
# for checking builds, e.g. FXFORGE_CXXFLAGS="-fsanitize=address -fno-omit-frame-pointer" with
# libasan preloaded (LD_PRELOAD) runs every kernel under AddressSanitizer.
EXTRA_FLAGS_ENV = "FXFORGE_CXXFLAGS"
# Fixed targets that replace -march=native for a kernel built in several ISA variants, one
# library each, chosen at run time (kernels/quant_gemv_cpu.py): a variant is then the same binary
# whatever CPU built it, and a lower one can be tested on a higher CPU. haswell is the first
# -march with AVX2+FMA+F16C; skylake-avx512 adds AVX-512 F/BW/VL/DQ/CD; cascadelake adds VNNI.
ISA_MARCH = {"portable": "-march=x86-64", "avx2": "-march=haswell",
             "avx512": "-march=skylake-avx512", "avx512_vnni": "-march=cascadelake"}


class KernelBuildError(FxforgeError, RuntimeError):
    """A generated kernel failed to compile or load."""


def compile_flags(isa: Optional[str] = None) -> tuple[str, ...]:
    """The flags of a build: FLAGS (``-march=native``), or with ``isa`` (a key of ISA_MARCH) its
    fixed target in place of any ``-march``; then FXFORGE_CXXFLAGS."""
    flags = FLAGS
    if isa is not None:
        if isa not in ISA_MARCH:
            raise ValueError(f"unknown ISA variant {isa!r}; one of {sorted(ISA_MARCH)}")
        flags = tuple(f for f in FLAGS if not f.startswith("-march=")) + (ISA_MARCH[isa],)
    return flags + tuple(shlex.split(os.environ.get(EXTRA_FLAGS_ENV, "")))


def source_hash(*parts: str) -> str:
    """SHA-256 of generated source plus everything else that changes the binary."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    """``<cache root>/kernels``, created owner-only; a private folder of this process instead
    when the cache is not trustworthy (``kernels/cache_trust.py``)."""
    return trusted_dir("kernels")


def find_compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise KernelBuildError("no C++ compiler found ($CXX, g++, clang++)")


@functools.lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"{compiler} --version failed: {exc}") from exc
    return out.stdout + _cpu_flags()


def _cpu_flags() -> str:
    """-march=native binaries are only valid on the same ISA: the CPU flags enter the key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_shared_object(source: str, name: str = "fused", rebuild: bool = False,
                        isa: Optional[str] = None) -> Path:
    """The kernel cache's name for ``source``'s library (the record of ``kernels/cache_trust.py``
    names the library file built for it), compiled there unless recorded already (or
    ``rebuild``). Whether it may be loaded is checked at load time: use :func:`load_function`.
    ``isa``: a fixed target of ISA_MARCH instead of ``-march=native`` (the flags enter the key).
    Raises KernelBuildError, also when no cache folder may be used."""
    compiler = find_compiler()
    flags = compile_flags(isa)
    key = source_hash(source, _compiler_identity(compiler), " ".join(flags))
    try:
        target = cache_dir() / f"{name}_{key[:32]}.so"
        if digest_path(target).exists() and not rebuild:
            return target
        with phase("C++ kernel builds"):
            _compile(compiler, flags, source, target)
    except OSError as exc:   # UntrustedCacheError included: no trustworthy folder to build in
        raise KernelBuildError(f"cannot build {name} in the kernel cache: {exc}") from exc
    return target


def _compile(compiler: str, flags: tuple[str, ...], source: str, target: Path) -> None:
    directory = target.parent
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "kernel.cpp"
        src.write_text(source)
        tmp_so = Path(tmp) / "kernel.so"
        cmd = [compiler, *flags, str(src), "-o", str(tmp_so)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"{' '.join(cmd)}: {exc}") from exc
        if done.returncode != 0 or not tmp_so.exists():
            raise KernelBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                   f"{done.stderr[-4000:]}")
        write_atomic(target.with_suffix(".cpp"), source.encode())   # for people; never read
        install_library(tmp_so, target)   # under its digest's name, then recorded for target


def load_function(source: str, symbol: str, name: str = "fused",
                  isa: Optional[str] = None) -> Callable:
    """Build (cached) and load ``symbol``. A cached library that fails the cache's trust check
    (owner, permissions, recorded digest: ``kernels/cache_trust.py``) or fails to load or lacks
    ``symbol`` is rebuilt once; the hostile or broken file is never loaded. The rebuilt library
    has a path of its own (it is named by its digest), so the retry loads it, not the image
    already mapped under the old path. ``isa``: as for :func:`build_shared_object`."""
    target = build_shared_object(source, name, isa=isa)
    try:
        return getattr(load_library(target), symbol)
    except (OSError, AttributeError):   # UntrustedCacheError is an OSError
        target = build_shared_object(source, name, rebuild=True, isa=isa)
        try:
            return getattr(load_library(target), symbol)
        except (OSError, AttributeError) as exc:
            raise KernelBuildError(f"cannot load {name} ({target}): {exc}") from exc


def build_failure(entry: Callable[[], Callable], what: str) -> Optional[str]:
    """Build and load a kernel through ``entry`` (a cached loader); None if it works, else
    ``"<what> unavailable (<error type>: <error>)"``: no compiler, a failed build or load. The
    callers then run the library op that computes the same."""
    try:
        entry()
    except Exception as exc:  # noqa: BLE001  (KernelBuildError, OSError, ...)
        return f"{what} unavailable ({type(exc).__name__}: {exc})"
    return None
