"""Generated Triton for fused row programs (GPU; runs on the CPU with ``TRITON_INTERPRET=1``).

One program handles ``BLOCK_R`` rows. When the row fits in ``BLOCK_N`` (``SINGLE``), every
value is computed once from whole-row tiles held in registers and reductions are
``tl.sum``/``tl.max`` along axis 1; otherwise each reduction phase loops over the row in
``BLOCK_N`` chunks with a tile-shaped accumulator, and a last loop stores. The source runs
from memory (``_import_kernel``); a copy is kept in the cache by content hash. bf16/fp16 results
are rounded where eager rounds, as in the C++ kernels.
"""
from __future__ import annotations

import linecache
import os
import sys
import types
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.kernels.cache_trust import trusted_dir, write_atomic
from fxforge.kernels.fused import build_program
from fxforge.kernels.row_program import ELEM, ROW, RowProgram, bind_shapes, kind_of, needed_by
from fxforge.kernels.row_render import COMPARE, TRITON, RowExprs
from fxforge.kernels.toolchain import source_hash
from fxforge.kernels.tuning import Config, Problem, TuningSpace

TL_DTYPE = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16",
            torch.float16: "tl.float16", torch.int64: "tl.int64", torch.int32: "tl.int32",
            torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
            torch.bool: "tl.int1"}
REGISTER = {"f": "tl.float32", "i": "tl.int64", "b": "tl.int1"}
MAX_TILE = 16384   # elements of one [BLOCK_R, BLOCK_N] tile kept in registers
HEADER = '''import triton
import triton.language as tl
from triton.language.extra import libdevice

import os

INF = tl.constexpr(float("inf"))
# NaN is spelled (INF * 0.0) at each use: a NaN global constexpr never equals itself, so Triton's
# launch-time check that globals are unchanged rejects every kernel that names one.


@triton.jit
def _bf16_round(x):
    # round-to-nearest-even to bf16, in bits: the interpreter's fp32->bf16 cast truncates
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))


if os.environ.get("TRITON_INTERPRET", "0") == "1":  # libdevice has no interpreter version
    @triton.jit
    def _tanh(x):
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def _erf(x):
        return tl.math.erf(x)

    @triton.jit
    def _pow(x, e):
        return tl.exp(e * tl.log(x))  # positive bases only (interpreter tests)
else:
    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def _erf(x):
        return libdevice.erf(x)

    @triton.jit
    def _pow(x, e):
        return libdevice.pow(x, e)
'''


def _literal(x: Any) -> str:
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, int):
        return repr(x)
    if x != x:
        return "(INF * 0.0)"
    if x in (float("inf"), float("-inf")):
        return "INF" if x > 0 else "(-INF)"
    return repr(float(x))


def _round(dtype: torch.dtype, expr: str) -> str:
    if dtype == torch.bfloat16:
        return f"_bf16_round({expr})"
    if dtype in (torch.bfloat16, torch.float16) or dtype in TL_DTYPE and kind_of(dtype) == "i" \
            and dtype != torch.int64:
        register = REGISTER[kind_of(dtype)]
        return f"({expr}).to({TL_DTYPE[dtype]}).to({register})"
    return expr


class _Emitter(RowExprs):
    target, column = "Triton", TRITON
    pow_call = "_pow({0}, {e})"
    select_col = "tl.where(cols < {at}, {0}, {1})"   # cat over the last dim

    def __init__(self, program: RowProgram):
        super().__init__(program)
        self.p = program

    def ref(self, vid: int) -> str:
        value = self.values[vid]
        if value.op == "ncols":
            return "nf"
        if value.op == "const":
            return _literal(value.attr)
        return f"{'r' if value.level == ROW else 'e'}{vid}"

    def literal(self, x: Any, kind: str) -> str:
        return _literal(x)

    def as_kind(self, vid: int, kind: str) -> str:
        source, expr = kind_of(self.values[vid].dtype), self.ref(vid)
        if source == kind or self.values[vid].op == "const" and kind != "b":
            return expr
        return f"({expr} != 0)" if kind == "b" else f"({expr}).to({REGISTER[kind]})"

    def convert(self, expr: str, op: str, source: str, result: str) -> str:
        if op in COMPARE:   # a comparison is already a Triton bool of any operand kind
            return expr
        return f"({expr} != 0)" if result == "b" else f"({expr}).to({REGISTER[result]})"

    def round(self, dtype: torch.dtype, expr: str) -> str:
        return _round(dtype, expr)

    def load(self, vid: int, elem_offsets: str, mask: str) -> str:
        value = self.values[vid]
        if value.op == "load_at":   # a last-dim slice: columns shifted, masked to the row
            i, shift = value.attr
            elem_offsets = f"({elem_offsets} + {shift})"
            mask = f"{mask} & ({elem_offsets} >= 0) & ({elem_offsets} < N)"
        else:
            i = value.attr
        offsets = f"b{i}" if value.level == ROW else f"b{i} + {elem_offsets} * s{i}"
        row_mask = "rmask" if value.level == ROW else mask
        raw = f"tl.load(in{i} + {offsets}, mask={row_mask}, other=0)"
        return f"{raw}.to({REGISTER[kind_of(value.dtype)]})" if value.dtype != torch.bool \
            else f"({raw} != 0)"

    def define(self, vid: int, cols: str, mask: str) -> str:
        value = self.values[vid]
        expr = (self.load(vid, cols, mask) if value.op in ("load", "load_at")
                else self.op_expr(vid))
        return f"{self.ref(vid)} = {expr}"


class _Kernel:
    """Builds the kernel text: row set-up, then the SINGLE and the looped bodies."""

    def __init__(self, program: RowProgram, name: str):
        self.p, self.name, self.em = program, name, _Emitter(program)
        self.n_in, self.rank = len(program.inputs), program.rank

    def signature(self) -> str:
        params = [f"in{i}" for i in range(self.n_in)] + [f"out{k}" for k in
                                                         range(len(self.p.outputs))]
        params += ["rows", "N"] + [f"lead{d}" for d in range(self.rank - 1)]
        params += [f"st{i}_{d}" for i in range(self.n_in) for d in range(self.rank)]
        params += ["BLOCK_R: tl.constexpr", "BLOCK_N: tl.constexpr", "SINGLE: tl.constexpr"]
        return f"@triton.jit\ndef {self.name}({', '.join(params)}):"

    def setup(self) -> list[str]:
        lines = ["r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]).to(tl.int64)",
                 "rmask = r < rows", "nf = N * 1.0", "rem = r"]
        lines += [f"b{i} = tl.zeros([BLOCK_R, 1], dtype=tl.int64)" for i in range(self.n_in)]
        for d in range(self.rank - 2, -1, -1):
            lines += [f"idx = rem % lead{d}", f"rem = rem // lead{d}"]
            lines += [f"b{i} += idx * st{i}_{d}" for i in range(self.n_in)]
        lines += [f"s{i} = st{i}_{self.rank - 1}" for i in range(self.n_in)]
        lines += ["zero_f = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)",
                  "zero_i = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int64)"]
        return lines

    def reduce_expr(self, vid: int, tile: str, axis_only: bool = False) -> list[str]:
        """Lines reducing the masked ``tile`` of reduction ``vid`` into ``r<vid>``."""
        value, name = self.p.values[vid], f"r{vid}"
        if value.op == "sum":
            lines = [f"{name} = tl.sum({tile}, axis=1, keep_dims=True)"]
        else:
            fn = "tl.max" if value.op == "max" else "tl.min"
            lines = [f"{name} = {fn}({tile}, axis=1, keep_dims=True)"]
            if value.ctype == "f":
                lines.append(f"{name} = tl.where(tl.sum(({tile} != {tile}).to(tl.int32), axis=1, "
                             f"keep_dims=True) > 0, INF * 0.0, {name})")
        return lines + [f"{name} = {_round(value.dtype, name)}"]

    @staticmethod
    def neutral(value) -> str:
        if value.op == "sum":
            return "0"
        if value.ctype == "f":
            return "-INF" if value.op == "max" else "INF"
        return "-9223372036854775807" if value.op == "max" else "9223372036854775807"

    def single_body(self) -> list[str]:
        lines = ["cols = tl.arange(0, BLOCK_N)[None, :]", "mask = rmask & (cols < N)"]
        for vid, value in enumerate(self.p.values):
            if value.op in ("const", "ncols"):
                continue
            if value.op in ("sum", "max", "min"):
                arg = self.em.as_kind(value.args[0], value.ctype)
                tile = f"tl.where(mask, {arg}, {self.neutral(value)})"
                lines += self.reduce_expr(vid, tile)
            else:
                lines.append(self.em.define(vid, "cols", "mask"))
        return lines + self.stores("cols", "mask", elem=True) + self.stores("", "", elem=False)

    def stores(self, cols: str, mask: str, elem: bool) -> list[str]:
        lines = []
        for k, o in enumerate(self.p.outputs):
            is_elem = self.p.values[o.value].level == ELEM
            if is_elem == elem:
                where = f"out{k} + r * N + {cols}" if elem else f"out{k} + r"
                value = self.em.ref(o.value)
                lines.append(f"tl.store({where}, ({value}).to({TL_DTYPE[o.dtype]}), "
                             f"mask={mask if elem else 'rmask'})")
        return lines

    def looped_elems(self, roots: list[int], done: set[int]) -> list[str]:
        lines = []
        for vid in needed_by(self.p, roots):
            value = self.p.values[vid]
            if value.op in ("const", "ncols") or vid in done:
                continue
            if value.level == ELEM:
                lines.append(self.em.define(vid, "cols", "mask"))
            else:
                raise AssertionError(f"row value v{vid} used before it is computed")
        return lines

    def looped_body(self) -> list[str]:
        lines, ready = [], set()
        loop_head = ["for start in range(0, N, BLOCK_N):",
                     "    cols = start + tl.arange(0, BLOCK_N)[None, :]",
                     "    mask = rmask & (cols < N)"]
        for red in self.p.reductions():
            lines += self.row_values(red, ready)
            value = self.p.values[red]
            acc = f"acc{red}"
            lines.append(f"{acc} = zero_{'f' if value.ctype == 'f' else 'i'} + "
                         f"{self.neutral(value)}")
            arg = self.em.as_kind(value.args[0], value.ctype)
            tile = f"tl.where(mask, {arg}, {self.neutral(value)})"
            combine = {"sum": f"{acc} + {tile}", "max": f"tl.maximum({acc}, {tile})",
                       "min": f"tl.minimum({acc}, {tile})"}[value.op]
            body = self.looped_elems([value.args[0]], ready) + [f"{acc} = {combine}"]
            lines += loop_head + ["    " + b for b in body] + self.reduce_expr(red, acc)
            ready.add(red)
        lines += self.row_values(len(self.p.values), ready)
        elem_outs = [o.value for o in self.p.outputs if self.p.values[o.value].level == ELEM]
        lines += self.stores("", "", elem=False)
        if elem_outs:
            body = self.looped_elems(elem_outs, ready) + self.stores("cols", "mask", elem=True)
            lines += loop_head + ["    " + b for b in body]
        return lines

    def row_values(self, before: int, ready: set[int]) -> list[str]:
        """Define every ROW value with id < ``before`` not yet defined (ids are topological)."""
        lines = []
        for vid in range(before):
            value = self.p.values[vid]
            if value.level == ROW and vid not in ready and value.op not in ("sum", "max", "min"):
                lines.append(self.em.define(vid, "cols", "mask"))
                ready.add(vid)
        return lines

    def source(self) -> str:
        body = ["    " + line for line in self.setup()]
        body += ["    if SINGLE:"] + ["        " + line for line in self.single_body()]
        body += ["    else:"] + ["        " + line for line in self.looped_body()]
        return "\n".join([HEADER, "", self.signature()] + body) + "\n"


def generate_source(program: RowProgram, name: str) -> str:
    return _Kernel(program, name).source()


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _prune(config: Config, problem: Problem) -> Optional[str]:
    block_r, block_n = config["BLOCK_R"], config["BLOCK_N"]
    if block_r * block_n > MAX_TILE:
        return f"tile {block_r}x{block_n} exceeds {MAX_TILE} elements in registers"
    if block_n > 2 * _next_pow2(problem["N"]) and block_n > 16:
        return f"BLOCK_N={block_n} is wider than the row ({problem['N']})"
    if block_r > _next_pow2(problem["rows"]):
        return f"BLOCK_R={block_r} is taller than the problem ({problem['rows']} rows)"
    return None


TUNING_SPACE = TuningSpace(
    kernel="fused_rows",
    configs=tuple(Config.of(num_warps=w, BLOCK_R=r, BLOCK_N=n) for r in (1, 2, 4, 8, 16)
                  for n in (64, 256, 1024, 4096) for w in (1, 2, 4, 8)),
    default=Config.of(num_warps=4, BLOCK_R=4, BLOCK_N=1024),
    prune=_prune,
)


def default_config(rows: int, ncols: int) -> Config:
    """Whole row in one tile up to 4096 columns, else 1024-wide chunks."""
    block_n = min(max(_next_pow2(ncols), 16), 4096)
    block_r = max(1, min(16, 2048 // block_n, _next_pow2(rows)))
    warps = 1 if block_r * block_n <= 512 else (4 if block_r * block_n <= 4096 else 8)
    return Config.of(num_warps=warps, BLOCK_R=block_r, BLOCK_N=block_n)


def _import_kernel(source: str, name: str) -> Any:
    """Run ``source`` as module ``fxforge_fused_<name>`` and return its kernel ``name``.

    It runs from memory, never through the import system, which would write a ``.pyc`` beside
    the file (in a ``__pycache__`` made with the umask's mode) and run such a file instead of the
    source whenever its header matches the source's mtime and size. Triton's ``@jit`` reads its
    kernel's text through ``inspect``, which finds it in ``linecache`` (an entry without an
    mtime is never re-read from disk). The copy in the cache (a private folder:
    ``kernels/cache_trust.py``) is for people and tracebacks; it is never read back."""
    module_name = f"fxforge_fused_{name}"
    if module_name in sys.modules:
        return getattr(sys.modules[module_name], name)
    path = str(trusted_dir("kernels", "triton") / f"{name}_{source_hash(source)[:16]}.py")
    if not os.path.lexists(path):   # the name holds the source's hash: an existing one is this
        write_atomic(Path(path), source.encode())
    linecache.cache[path] = (len(source), None, source.splitlines(keepends=True), path)
    module = types.ModuleType(module_name)
    module.__file__ = path
    sys.modules[module_name] = module   # inspect.getmodule looks for it while @jit runs
    try:
        exec(compile(source, path, "exec"), module.__dict__)   # noqa: S102  (source we generated)
    except BaseException:
        del sys.modules[module_name]
        raise
    return getattr(module, name)


class TritonFusedKernel:
    """Callable: allocates outputs on the inputs' device and launches the kernel."""

    def __init__(self, program: RowProgram, config: Optional[Config] = None):
        self.program, self.config = program, config
        self.name = f"fused_{program.digest()}"
        self.source = generate_source(program, self.name)
        self.kernel = _import_kernel(self.source, self.name)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [args[k] for k in self.program.tensor_args]
        bound = bind_shapes(self.program, inputs)
        device = inputs[0].device
        outs = tuple(torch.empty(shape, dtype=o.dtype, device=device)
                     for shape, o in zip(bound.out_shapes, self.program.outputs))
        if bound.rows == 0:
            return outs
        config = self.config or default_config(bound.rows, bound.ncols)
        block_r, block_n = config["BLOCK_R"], config["BLOCK_N"]
        grid = ((bound.rows + block_r - 1) // block_r,)
        self.kernel[grid](*inputs, *outs, bound.rows, bound.ncols, *bound.lead,
                          *[s for strides in bound.strides for s in strides],
                          BLOCK_R=block_r, BLOCK_N=block_n, SINGLE=bound.ncols <= block_n,
                          num_warps=config.num_warps, num_stages=config.num_stages)
        return outs


def compile_fused_triton(gm: fx.GraphModule, config: Optional[Config] = None) -> TritonFusedKernel:
    """A fusion group -> a Triton launcher (raises Unsupported); ``config`` from TUNING_SPACE."""
    return TritonFusedKernel(build_program(gm), config)
