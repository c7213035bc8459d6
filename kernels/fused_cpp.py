"""Generated C++ for fused row programs (CPU).

One ``extern "C"`` function per program, no torch headers (a build takes ~1 s): the outer
loop runs over rows (OpenMP ``parallel for`` when the caller passes nthreads > 1, which it does
only above ``PARALLEL_MIN_WORK``), each reduction phase and the final store loop run over the
last dim as ``#pragma omp simd`` loops (a contiguous fast path when every per-element input has
inner stride 1). exp/log/tanh/erf/sigmoid are the branch-free ``fxf_*`` functions of ``MATH``
(within 2 ulp, see the tests), so those loops vectorize with 256-bit AVX2; no ``-ffast-math``
(``-fno-trapping-math``/``-fno-math-errno`` change no result). A costly value that the last
reduction loop computes (a softmax's exp) is stored in an output buffer and read back by the
output loop. bf16 is stored as uint16 and converted with bit shifts (round-to-nearest-even on
the way back). Binaries live in a cache directory keyed by the SHA-256 of source, compiler
version and flags, and are loaded only after the checks of ``kernels/cache_trust.py``.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.kernels.cache_trust import digest_path, install_library, load_library, write_atomic
from fxforge.kernels.fused import (ELEM, ROW, KernelBuildError, RowProgram, Unsupported,
                                   bind_shapes, build_program, cache_dir, kind_of, needed_by,
                                   source_hash)
from fxforge.kernels.fused_cpp_math import MATH
from fxforge.kernels.plan_cache import PlanCache
from fxforge.kernels.replay import launch

FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=256", "-fno-trapping-math", "-fno-math-errno",
         "-fopenmp", "-shared", "-fPIC", "-std=gnu++17")
# Extra compiler flags for every kernel build, from the environment (they enter the cache key):
# for checking builds, e.g. FXFORGE_CXXFLAGS="-fsanitize=address -fno-omit-frame-pointer" with
# libasan preloaded (LD_PRELOAD) runs every kernel under AddressSanitizer.
EXTRA_FLAGS_ENV = "FXFORGE_CXXFLAGS"


def compile_flags() -> tuple[str, ...]:
    return FLAGS + tuple(shlex.split(os.environ.get(EXTRA_FLAGS_ENV, "")))

MAX_PLANS = 64                # cached input layouts per kernel (decode steps vary the length)
PARALLEL_MIN_WORK = 1 << 15   # elements x work_per_element below which one thread is faster
EXPENSIVE_WORK = 8            # an exp/erf/tanh/... counts as this many cheap ops
CTYPES_SCALAR = {torch.float32: "float", torch.bfloat16: "uint16_t", torch.float16: "_Float16",
                 torch.int64: "int64_t", torch.int32: "int32_t", torch.int16: "int16_t",
                 torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "uint8_t"}


PRELUDE = r"""#include <stdint.h>
#include <string.h>
#include <math.h>
static inline float bf16_load(uint16_t u) { uint32_t b = (uint32_t)u << 16; float f; memcpy(&f, &b, 4); return f; }
static inline uint16_t bf16_store(float f) {
  uint32_t b; memcpy(&b, &f, 4);
  uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}
static inline float bf16_round(float f) { return bf16_load(bf16_store(f)); }
static inline float f16_round(float f) { return (float)(_Float16)f; }
static inline int64_t fxf_col(int64_t c, int64_t n) { return c < 0 ? 0 : (c >= n ? n - 1 : c); }
"""

REGISTER = {"f": "float", "i": "int64_t", "b": "bool"}
GELU_TANH_BETA = "0.7978845608028654f"   # sqrt(2 / pi)
FLOAT_OPS = {
    "neg": "(-{0})", "abs": "fabsf({0})", "exp": "fxf_exp({0})", "log": "fxf_log({0})",
    "sqrt": "sqrtf({0})", "rsqrt": "(1.0f / sqrtf({0}))", "reciprocal": "(1.0f / {0})",
    "tanh": "fxf_tanh({0})", "sigmoid": "fxf_sigmoid({0})", "erf": "fxf_erf({0})",
    "relu": "({0} < 0.0f ? 0.0f : {0})", "silu": "({0} / (1.0f + fxf_exp(-{0})))",
    "sin": "sinf({0})", "cos": "cosf({0})",
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "maximum": "(({0} != {0}) ? {0} : (({0} > {1}) ? {0} : {1}))",
    "minimum": "(({0} != {0}) ? {0} : (({0} < {1}) ? {0} : {1}))",
    "where": "({0} ? {1} : {2})", "cast": "{0}",
}
INT_OPS = {"neg": "(-{0})", "abs": "({0} < 0 ? -{0} : {0})", "relu": "({0} < 0 ? 0 : {0})",
           "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})",
           "maximum": "({0} > {1} ? {0} : {1})", "minimum": "({0} < {1} ? {0} : {1})",
           "where": "({0} ? {1} : {2})", "cast": "{0}", "bitwise_not": "(~{0})"}
BOOL_OPS = {"logical_not": "(!{0})", "bitwise_not": "(!{0})", "logical_and": "({0} && {1})",
            "where": "({0} ? {1} : {2})", "cast": "{0}", "maximum": "({0} || {1})",
            "minimum": "({0} && {1})", "mul": "({0} && {1})", "add": "({0} || {1})"}
COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
POW_SPECIAL = {2.0: "({0} * {0})", 1.0: "{0}", 0.5: "sqrtf({0})", 3.0: "({0} * {0} * {0})",
               -1.0: "(1.0f / {0})", -2.0: "(1.0f / ({0} * {0}))", -0.5: "(1.0f / sqrtf({0}))",
               0.0: "1.0f"}
STORAGE_CAST = {torch.int32: "int32_t", torch.int16: "int16_t", torch.int8: "int8_t",
                torch.uint8: "uint8_t"}


def round_expr(dtype: torch.dtype, expr: str) -> str:
    """Round a register value to ``dtype`` the way storing it in eager would."""
    if dtype == torch.bfloat16:
        return f"bf16_round({expr})"
    if dtype == torch.float16:
        return f"f16_round({expr})"
    if dtype in STORAGE_CAST:
        return f"(int64_t)({STORAGE_CAST[dtype]})({expr})"
    return expr


def store_expr(dtype: torch.dtype, expr: str) -> str:
    if dtype == torch.bfloat16:
        return f"bf16_store({expr})"
    if dtype == torch.float16:
        return f"(_Float16)({expr})"
    if dtype == torch.bool:
        return f"(uint8_t)({expr})"
    return f"({CTYPES_SCALAR[dtype]})({expr})"


def float_literal(x: float) -> str:
    if x != x:
        return "NAN"
    if x in (float("inf"), float("-inf")):
        return "INFINITY" if x > 0 else "(-INFINITY)"
    return f"((float){x.hex()})"


class CExprs:
    """C expressions for the values of a program (names, literals, conversions, ops)."""

    def __init__(self, program: RowProgram):
        self.values = program.values

    def ref(self, vid: int) -> str:
        value = self.values[vid]
        if value.op == "ncols":
            return "(float)N"
        if value.op == "const":
            x = value.attr
            if isinstance(x, bool):
                return "true" if x else "false"
            return f"{x}LL" if isinstance(x, int) else float_literal(x)
        return f"{'r' if value.level == ROW else 'e'}{vid}"

    def as_kind(self, vid: int, kind: str) -> str:
        source, expr = kind_of(self.values[vid].dtype), self.ref(vid)
        if source == kind:
            return expr
        if kind == "b":
            return f"({expr} != 0)"
        return f"(({REGISTER[kind]}){expr})"

    def op_expr(self, vid: int) -> str:
        value = self.values[vid]
        kinds = [value.ctype] * len(value.args)
        if value.op == "where":
            kinds[0] = "b"
        args = [self.as_kind(a, k) for a, k in zip(value.args, kinds)]
        if value.op in COMPARE:
            expr = f"({args[0]} {COMPARE[value.op]} {args[1]})"
        elif value.op == "pow":
            template = POW_SPECIAL.get(value.attr, "powf({0}, %s)" % float_literal(value.attr))
            expr = template.format(*args)
        elif value.op == "gelu":
            expr = self.gelu(args[0], value.attr)
        elif value.op == "clamp":
            expr = self.clamp(args[0], value.attr, value.ctype)
        elif value.op == "select_col":   # cat over the last dim (j: the column)
            expr = f"(j < {value.attr}LL ? {args[0]} : {args[1]})"
        else:
            table = {"f": FLOAT_OPS, "i": INT_OPS, "b": BOOL_OPS}[value.ctype]
            if value.op not in table:
                raise Unsupported(f"{value.op} on {value.dtype} in C++")
            expr = table[value.op].format(*args)
        result = kind_of(value.dtype)
        if result != value.ctype:   # e.g. a cast: the op ran in the source kind
            expr = (f"({expr} != 0)" if result == "b" else f"(({REGISTER[result]}){expr})")
        return round_expr(value.dtype, expr)

    @staticmethod
    def gelu(x: str, approximate: str) -> str:
        if approximate == "tanh":
            inner = f"{GELU_TANH_BETA} * ({x} + 0.044715f * {x} * {x} * {x})"
            return f"(0.5f * {x} * (1.0f + fxf_tanh({inner})))"
        return f"(0.5f * {x} * (1.0f + fxf_erf({x} * 0.70710678118654752440f)))"

    def clamp(self, x: str, bounds: tuple, ctype: str) -> str:
        lit = float_literal if ctype == "f" else (lambda b: f"{int(b)}LL")
        lo, hi = bounds
        if lo is not None:
            x = f"({x} < {lit(lo)} ? {lit(lo)} : {x})"
        if hi is not None:
            x = f"({x} > {lit(hi)} ? {lit(hi)} : {x})"
        return x

    def load_expr(self, index: int, position: str) -> str:
        value = next(v for v in self.values if v.op == "load" and v.attr == index)
        raw = f"p{index}[{position}]"
        return {torch.float32: raw, torch.bfloat16: f"bf16_load({raw})",
                torch.float16: f"(float){raw}", torch.bool: f"({raw} != 0)"}.get(
            value.dtype, f"(int64_t){raw}")

    def define(self, vid: int, load: Optional[str]) -> str:
        value = self.values[vid]
        expr = load if load is not None else self.op_expr(vid)
        return f"const {REGISTER[kind_of(value.dtype)]} {self.ref(vid)} = {expr};"

    def accumulator(self, vid: int) -> tuple[str, str, list[str], list[str]]:
        """(declaration, omp clause, loop-body update, after-loop fix-up) of a reduction."""
        value, name = self.values[vid], self.ref(vid)
        kind = value.ctype
        arg = self.as_kind(value.args[0], kind)
        ctype = REGISTER["i" if kind == "b" else kind]
        post = [f"{name} = {round_expr(value.dtype, name)};"] if kind == "f" else []
        if value.op == "sum":
            return f"{ctype} {name} = 0;", f"reduction(+:{name})", [f"{name} += {arg};"], post
        better = ">" if value.op == "max" else "<"
        if kind != "f":
            start = "INT64_MIN" if value.op == "max" else "INT64_MAX"
            return (f"{ctype} {name} = {start};", f"reduction({value.op}:{name})",
                    [f"{name} = {arg} {better} {name} ? {arg} : {name};"], post)
        start = "(-INFINITY)" if value.op == "max" else "INFINITY"
        update = [f"{{ const float t = {arg}; {name} = t {better} {name} ? t : {name}; "
                  f"{name}_nan |= (t != t); }}"]
        return (f"float {name} = {start}; int {name}_nan = 0;",
                f"reduction({value.op}:{name}) reduction(|:{name}_nan)", update,
                [f"if ({name}_nan) {name} = NAN;"] + post)


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


def build_shared_object(source: str, name: str = "fused", rebuild: bool = False) -> Path:
    """The kernel cache's name for ``source``'s library (the record of ``kernels/cache_trust.py``
    names the library file built for it), compiled there unless recorded already (or
    ``rebuild``). Whether it may be loaded is checked at load time: use :func:`load_function`.
    Raises KernelBuildError, also when no cache folder may be used."""
    compiler = find_compiler()
    flags = compile_flags()
    key = source_hash(source, _compiler_identity(compiler), " ".join(flags))
    try:
        target = cache_dir() / f"{name}_{key[:32]}.so"
        if digest_path(target).exists() and not rebuild:
            return target
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


def load_function(source: str, symbol: str, name: str = "fused") -> Callable:
    """Build (cached) and load ``symbol``. A cached library that fails the cache's trust check
    (owner, permissions, recorded digest: ``kernels/cache_trust.py``) or fails to load or lacks
    ``symbol`` is rebuilt once; the hostile or broken file is never loaded. The rebuilt library
    has a path of its own (it is named by its digest), so the retry loads it, not the image
    already mapped under the old path."""
    target = build_shared_object(source, name)
    try:
        return getattr(load_library(target), symbol)
    except (OSError, AttributeError):   # UntrustedCacheError is an OSError
        target = build_shared_object(source, name, rebuild=True)
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


class _RowBody:
    """Emits the statements for one row: row loads, reduction phases, stores."""

    def __init__(self, program: RowProgram, fast: bool, simdlen: int = 0):
        self.p, self.fast, self.rank = program, fast, program.rank
        self.simdlen = f" simdlen({simdlen})" if simdlen else ""   # a tuning knob
        self.exprs = CExprs(program)
        self.ready: set[int] = set()   # ROW values already defined in the row scope
        self.cached: dict[int, int] = {}   # ELEM value -> output whose buffer holds it

    def elem_loop(self, targets: list[int], prologue: list[str], body_tail: list[str],
                  pragma: str, reuse: Optional[dict[int, int]] = None) -> list[str]:
        """A loop over the row; values in ``reuse`` are read back from their output buffer."""
        reuse = reuse or {}
        deps = [i for i in _elem_cone(self.p, targets, set(reuse))]
        body = [self.exprs.define(i, f"o{reuse[i]}[r * N + j]" if i in reuse else self.load(i))
                for i in deps]
        return (prologue + [pragma + self.simdlen, "for (int64_t j = 0; j < N; ++j) {"]
                + ["  " + line for line in body + body_tail] + ["}"])

    def load(self, vid: int) -> Optional[str]:
        value = self.p.values[vid]
        if value.op == "load_at":   # a last-dim slice: another column of the row
            index, offset = value.attr
            col = f"fxf_col(j + ({offset}LL), N)"
            return self.exprs.load_expr(index, col if self.fast else f"{col} * s{index}")
        if value.op != "load":
            return None
        index = "0" if value.level == ROW else ("j" if self.fast else f"j * s{value.attr}")
        return self.exprs.load_expr(value.attr, index)

    def define_rows(self, roots: list[int]) -> list[str]:
        lines = []
        for i in needed_by(self.p, roots):
            if self.p.values[i].level == ROW and i not in self.ready:
                self.ready.add(i)
                if self.p.values[i].op not in ("sum", "max", "min"):
                    lines.append(self.exprs.define(i, self.load(i)))
        return lines

    def phases(self) -> list[list[int]]:
        """Reductions grouped so that none in a phase reads another of the same phase."""
        groups: list[list[int]] = []
        for red in self.p.reductions():
            deps = set(needed_by(self.p, [red])) - {red}
            if groups and not deps.intersection(groups[-1]):
                groups[-1].append(red)
            else:
                groups.append([red])
        return groups

    def reduction_phase(self, reds: list[int], cache: dict[int, int]) -> list[str]:
        lines = self.define_rows([self.p.values[r].args[0] for r in reds])
        clauses, tail, finish = [], [], []
        for r in reds:
            init, clause, update, post = self.exprs.accumulator(r)
            lines.append(init)
            clauses.append(clause)
            tail += update
            finish += post
            self.ready.add(r)
        tail += [f"o{k}[r * N + j] = {self.exprs.ref(v)};" for v, k in cache.items()]
        pragma = "#pragma omp simd " + " ".join(clauses)
        args = [self.p.values[r].args[0] for r in reds]
        return lines + self.elem_loop(args, [], tail, pragma) + finish

    def lines(self) -> list[str]:
        out, phases = [], self.phases()
        outs = list(enumerate(self.p.outputs))
        elem_outs = [(k, o) for k, o in outs if self.p.values[o.value].level == ELEM]
        if phases and elem_outs:
            last_args = [self.p.values[r].args[0] for r in phases[-1]]
            self.cached = _cache_plan(self.p, last_args, elem_outs)
        for i, phase in enumerate(phases):
            out += self.reduction_phase(phase, self.cached if i == len(phases) - 1 else {})
        # an output whose own value was stored by the last reduction loop is complete
        elem_outs = [(k, o) for k, o in elem_outs if self.cached.get(o.value) != k]
        out += self.define_rows([o.value for _, o in outs])
        for k, o in outs:
            if self.p.values[o.value].level != ELEM:
                out.append(f"o{k}[r] = {store_expr(o.dtype, self.exprs.ref(o.value))};")
        if elem_outs:
            stores = [f"o{k}[r * N + j] = {store_expr(o.dtype, self.exprs.ref(o.value))};"
                      for k, o in elem_outs]
            out += self.elem_loop([o.value for _, o in elem_outs], [], stores,
                                  "#pragma omp simd", self.cached)
        return out


EXPENSIVE = frozenset({"exp", "log", "tanh", "erf", "sigmoid", "silu", "gelu", "sin", "cos",
                       "pow"})


def _elem_cone(program: RowProgram, roots: list[int], stop: set[int]) -> list[int]:
    """ELEM values (in order) that computing ``roots`` needs, not looking past ``stop``."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i not in seen and program.values[i].level == ELEM:
            seen.add(i)
            if i not in stop:
                stack.extend(program.values[i].args)
    return sorted(seen)


def _cache_plan(program: RowProgram, phase_args: list[int], elem_outs: list) -> dict[int, int]:
    """Values the last reduction loop computes, the output loop needs again and that are
    costly (a softmax's exp): the reduction loop stores each in an fp32 output buffer, where
    the output loop reads it back instead of computing it again."""
    values = program.values
    shared = set(_elem_cone(program, phase_args, set()))
    final = _elem_cone(program, [o.value for _, o in elem_outs], set())
    shared &= set(final)
    output_values = {o.value for _, o in elem_outs}
    frontier = [v for v in sorted(shared) if values[v].op != "load" and (
        v in output_values or any(v in values[c].args for c in final if c not in shared))]
    plan: dict[int, int] = {}
    for v in frontier:
        if not any(values[i].op in EXPENSIVE for i in _elem_cone(program, [v], set())):
            continue
        for k, o in elem_outs:
            if (o.dtype == torch.float32 and o.shape == "full" and k not in plan.values()
                    and v in _elem_cone(program, [o.value], set())):
                plan[v] = k
                break
    return plan


def _row_setup(program: RowProgram) -> list[str]:
    """Per-row base pointers from the flattened row index and the leading strides."""
    rank, lines = program.rank, ["int64_t rem = r;"]
    n_in = len(program.inputs)
    for i in range(n_in):
        lines.append(f"int64_t b{i} = 0;")
    for d in range(rank - 2, -1, -1):
        lines.append(f"{{ int64_t idx = rem % lead[{d}]; rem /= lead[{d}];")
        lines += [f"  b{i} += idx * st[{i * rank + d}];" for i in range(n_in)]
        lines.append("}")
    for i, spec in enumerate(program.inputs):
        ctype = CTYPES_SCALAR[spec.dtype]
        lines.append(f"const {ctype}* __restrict__ p{i} = (const {ctype}*)ptrs[{i}] + b{i};")
    return lines


def generate_source(program: RowProgram, symbol: str, chunk: int = 0, simdlen: int = 0) -> str:
    """``void symbol(meta, nthreads, in_0.., out_0..)``: pointers as arguments, so a call
    needs no pointer array; ``nthreads`` > 1 runs rows in parallel (the caller decides).
    Tuning knobs: ``chunk`` rows per OpenMP chunk (0: even static split), ``simdlen`` the
    vector loops' preferred lanes (0: the compiler's choice)."""
    rank, n_in = program.rank, len(program.inputs)
    elem_inputs = [i for i, s in enumerate(program.inputs) if s.level == ELEM]
    params = ", ".join(f"void* a{i}" for i in range(n_in + len(program.outputs)))
    head = [PRELUDE, MATH,
            f'extern "C" void {symbol}(const int64_t* meta, int nthreads, {params}) {{',
            f"  void* ptrs[] = {{{', '.join(f'a{i}' for i in range(n_in))}{'' if n_in else '0'}}};",
            "  const int64_t rows = meta[0], N = meta[1];",
            "  const int64_t* lead = meta + 2;",
            f"  const int64_t* st = meta + {2 + max(rank - 1, 0)};"]
    head += [f"  const int64_t s{i} = st[{i * rank + rank - 1}];" for i in range(n_in)]
    for k, o in enumerate(program.outputs):
        ctype = CTYPES_SCALAR[o.dtype]
        head.append(f"  {ctype}* __restrict__ o{k} = ({ctype}*)a{n_in + k};")
    fast = " && ".join(f"s{i} == 1" for i in elem_inputs) or "true"
    head.append("  const bool parallel = nthreads > 1 && rows > 1;")
    head.append(f"  const bool fast = {fast};")
    body = []
    for variant in (True, False):
        rows_body = _row_setup(program) + _RowBody(program, variant, simdlen).lines()
        schedule = f"static, {chunk}" if chunk else "static"
        body += [f"  if ({'' if variant else '!'}fast) {{",
                 f"    #pragma omp parallel for schedule({schedule}) num_threads(nthreads) if(parallel)",
                 "    for (int64_t r = 0; r < rows; ++r) {"]
        body += ["      " + line for line in rows_body] + ["    }", "  }"]
    return "\n".join(head + body + ["}", ""])


def work_per_element(program: RowProgram) -> int:
    """A rough cost of one element, in units of a cheap op, for the threading decision."""
    passes = len(_RowBody(program, True).phases()) + 1
    costly = sum(1 for v in program.values if v.level == ELEM and v.op in EXPENSIVE)
    return passes + EXPENSIVE_WORK * costly


class CpuFusedKernel:
    """Callable: allocates the outputs and calls the compiled function on raw pointers.

    The per-call path is kept short (~14 us here, was ~21): one
    layout-key lookup, one ``torch.empty_strided`` per output from cached shapes and strides,
    and a ctypes call with precomputed argtypes taking the data pointers as plain ints."""

    def __init__(self, program: RowProgram, function: Callable, source: str, threads: int = 0):
        self.program, self.source = program, source
        self.threads = threads      # 0: one thread below PARALLEL_MIN_WORK, else torch's
        self.function = function
        n_ptrs = len(program.inputs) + len(program.outputs)
        function.restype = None
        function.argtypes = (ctypes.c_void_p, ctypes.c_int) + (ctypes.c_void_p,) * n_ptrs
        self.meta_len = 2 + max(program.rank - 1, 0) + program.rank * len(program.inputs)
        self.meta_array = ctypes.c_int64 * self.meta_len
        self.dtypes = tuple(s.dtype for s in program.inputs)
        self.out_dtypes = tuple(o.dtype for o in program.outputs)
        self.all_tensors = len(program.tensor_args) == program.n_args
        self.work_per_element = work_per_element(program)
        self.plans = PlanCache(MAX_PLANS)   # one per input layout (kernels/plan_cache.py)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = args if self.all_tensors else [args[k] for k in self.program.tensor_args]
        # The hot path: everything derived from sizes/strides is cached per layout.
        key = tuple([(t.shape, t.stride(), t.dtype, t.is_cpu) for t in inputs])
        plan = self.plans.get(key)
        if plan is None:
            plan = self._plan(inputs, key)
        meta_address, out_specs, parallel, _ = plan
        empty = torch.empty   # outputs are contiguous; sizes as arguments cost ~1 us less
        outs = [empty(*shape, dtype=dtype) if shape else empty((), dtype=dtype)
                for shape, dtype in out_specs]
        threads = self.threads or (torch.get_num_threads() if parallel else 1)
        launch(self.function, (meta_address, threads, *[t.data_ptr() for t in inputs],
                               *[o.data_ptr() for o in outs]), plan)
        return tuple(outs)

    def _plan(self, inputs, key) -> tuple:
        for t, dtype in zip(inputs, self.dtypes):
            if t.dtype != dtype or t.device.type != "cpu":
                raise ValueError(f"fused CPU kernel expects {self.dtypes} on cpu, got "
                                 f"{[(x.dtype, x.device.type) for x in inputs]}")
        bound = bind_shapes(self.program, inputs)
        meta = self.meta_array(bound.rows, bound.ncols, *bound.lead,
                               *[s for strides in bound.strides for s in strides])
        out_specs = tuple((tuple(shape), dtype)
                          for shape, dtype in zip(bound.out_shapes, self.out_dtypes))
        parallel = bound.rows * bound.ncols * self.work_per_element >= PARALLEL_MIN_WORK
        # meta is read-only in C; the plan keeps it alive while its address is in use
        return self.plans.add(key, (ctypes.addressof(meta), out_specs, parallel, meta))


def compile_program_cpu(program: RowProgram, threads: int = 0, chunk: int = 0,
                        simdlen: int = 0) -> CpuFusedKernel:
    symbol = f"fused_{program.digest()}"
    source = generate_source(program, symbol, chunk, simdlen)
    return CpuFusedKernel(program, load_function(source, symbol), source, threads)


def compile_fused_cpu(gm: fx.GraphModule) -> CpuFusedKernel:
    """A fusion group -> a CPU callable (raises Unsupported or KernelBuildError), with the
    knobs the tuning session picks for it (``fused_cpp_tuning``; defaults outside a session)."""
    from fxforge.kernels.fused_cpp_tuning import tuned_knobs
    program = build_program(gm)
    return compile_program_cpu(program, **tuned_knobs(program, gm))
