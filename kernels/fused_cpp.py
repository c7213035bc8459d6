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
the way back). The op spellings and the expression renderer are shared with the Triton
renderer (``kernels/row_render.py``); builds, the binary cache and its trust checks are the
C++ toolchain's (``kernels/toolchain.py``).
"""
from __future__ import annotations

import ctypes
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.kernels.fused import build_program
from fxforge.kernels.row_program import ELEM, ROW, RowProgram, bind_shapes, kind_of, needed_by
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.plan_cache import PlanCache
from fxforge.kernels.replay import launch
from fxforge.kernels.row_render import CPP, RowExprs
from fxforge.kernels.toolchain import load_function

MAX_PLANS = 64                # cached input layouts per kernel (decode steps vary the length)
PARALLEL_MIN_WORK = 1 << 15   # elements x work_per_element below which one thread is faster
EXPENSIVE_WORK = 8            # an exp/erf/tanh/... counts as this many cheap ops
CTYPES_SCALAR = {torch.float32: "float", torch.bfloat16: "uint16_t", torch.float16: "_Float16",
                 torch.int64: "int64_t", torch.int32: "int32_t", torch.int16: "int16_t",
                 torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "uint8_t"}
REGISTER = {"f": "float", "i": "int64_t", "b": "bool"}
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
    return f"((float){float(x).hex()})"   # an int constant (a clamp bound) too


class CExprs(RowExprs):
    """C expressions for the values of a program (names, literals, conversions, ops)."""

    target, column = "C++", CPP
    pow_call = "powf({0}, {e})"
    select_col = "(j < {at} ? {0} : {1})"   # j: the column

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

    def literal(self, x, kind: str) -> str:
        return float_literal(x) if kind == "f" else f"{int(x)}LL"

    def as_kind(self, vid: int, kind: str) -> str:
        source, expr = kind_of(self.values[vid].dtype), self.ref(vid)
        if source == kind:
            return expr
        if kind == "b":
            return f"({expr} != 0)"
        return f"(({REGISTER[kind]}){expr})"

    def convert(self, expr: str, op: str, source: str, result: str) -> str:
        return f"({expr} != 0)" if result == "b" else f"(({REGISTER[result]}){expr})"

    def round(self, dtype: torch.dtype, expr: str) -> str:
        return round_expr(dtype, expr)

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
