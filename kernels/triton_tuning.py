"""The autotuner's view of the three Triton kernels: ``triton_linear`` (the matmul template with
its fused epilogue), ``triton_attention`` (flash attention) and ``triton_fused`` (generated row
kernels of fusion groups).

For each: a ``*_task`` building the :class:`TuningTask` (the varying sizes bucketed to powers of
two), the per-problem tuning space (the kernel module's space, its default being what runs
untuned: ``choose_config`` / ``default_config`` for that problem), and a :class:`Tunable` that
launches the real kernel with one config on random inputs of the task's shape. ``cost`` is a
roofline-style model of an H100-class GPU (waves of tiles x work per tile, padding wasted on
tiles larger than the problem, registers per thread for the warp count) used only to rank.

Under ``TRITON_INTERPRET=1`` the tensors live on the CPU and the candidates run in the
interpreter: correctness filtering is real, the times mean nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.kernels import attention, fused_triton, matmul
from fxforge.kernels.fused import build_program
from fxforge.kernels.row_program import RowProgram
from fxforge.kernels.fused_inputs import example_shapes, random_inputs, rows_and_cols
from fxforge.kernels.toolchain import source_hash
from fxforge.kernels.tuning import (Config, Tunable, TuningSpace, TuningTask, bucket, choose, current,
                                    register_family)

SM_COUNT = 132                   # H100 SXM; the cost model's default when no GPU is visible
SM_FLOPS = 990e12 / 132          # dense bf16 tensor-core FLOP/s per SM
SM_BYTES = 3.3e12 / 132          # HBM bytes/s per SM when every SM streams
SM_L2_BYTES = 10e12 / 132        # L2 bytes/s per SM (operand tiles re-read by other tiles)
LAUNCH_S = 3e-6                  # a kernel launch


# ------------------------------------------------------------------------------ shared pieces
@functools.lru_cache(maxsize=None)
def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_kind(device: torch.device | str) -> str:
    """The task's device: "cuda" for CUDA tensors, "cpu" otherwise (the interpreter)."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def _gpu_fields(device: str) -> dict:
    """Problem fields that change which configs can run: the GPU's shared memory per block."""
    if device != "cuda" or not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = getattr(props, "shared_memory_per_block_optin", matmul.DEFAULT_SMEM_LIMIT)
    return {"smem_limit": int(limit)}


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return SM_COUNT


def _waves(programs: int, device: str) -> int:
    return math.ceil(programs / _sm_count(device))


def _register_penalty(per_thread: float, ideal: float) -> float:
    """1 at ``ideal`` values per thread, growing by 10% per factor of two away from it."""
    return 1.0 + 0.1 * abs(math.log2(max(per_thread, 1e-9) / ideal))


def session_pick(space: TuningSpace, task: Callable[[], TuningTask]) -> Optional[Config]:
    """The open session's config if it differs from ``space.default``, else None: a kernel
    given None keeps its untuned, per-shape default (what a dynamic shape needs)."""
    active = current()
    if active is None or active.mode == "off":
        return None
    config = choose(space, task)
    return None if config == space.default else config


class _TritonTunable(Tunable):
    def __init__(self, task: TuningTask):
        super().__init__(task)
        self.device = task.device
        # The interpreter is Python: threads buy nothing. On a GPU, Triton compiles concurrently.
        self.parallel_build = task.device == "cuda" and not matmul.interpreting()
        self.generator = torch.Generator().manual_seed(1234)

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        """Random values made on the CPU (seeded) and moved to the task's device."""
        values = torch.randn(*shape, generator=self.generator) * scale
        return values.to(dtype).to(self.device)


# ------------------------------------------------------------------------------ triton_linear
def linear_task(m: int, k: int, n: int, dtype: torch.dtype, activation: str, has_bias: bool,
                has_residual: bool, device: torch.device | str = "cpu",
                out_dtype: Optional[torch.dtype] = None) -> TuningTask:
    kind = device_kind(device)
    problem = {"M": bucket(m), "K": int(k), "N": int(n), "dtype": dtype_name(dtype),
               "out": dtype_name(out_dtype or dtype), "activation": activation,
               "bias": bool(has_bias), "residual": bool(has_residual), **_gpu_fields(kind)}
    return TuningTask.make("triton_linear", __name__, problem, _file_hash(matmul.__file__), kind)


def linear_space(problem: dict) -> TuningSpace:
    """The matmul space with ``choose_config``'s pick for this problem as its default."""
    space = matmul.TUNING_SPACE
    return dataclasses.replace(space, default=matmul.choose_config(problem))


class LinearTritonTunable(_TritonTunable):
    def __init__(self, task: TuningTask):
        super().__init__(task)
        p = self.problem
        self.space = linear_space(p)
        m, k, n = p["M"], p["K"], p["N"]
        dtype, self.out_dtype = getattr(torch, p["dtype"]), getattr(torch, p["out"])
        self.x = self.randn(m, k, dtype=dtype)
        self.weight = self.randn(n, k, dtype=dtype, scale=k ** -0.5).t()  # nn.Linear's view
        self.bias = self.randn(n, dtype=dtype) if p["bias"] else None
        self.residual = self.randn(m, n, dtype=dtype) if p["residual"] else None

    def build(self, config: Config):
        x, weight, bias, residual = self.x, self.weight, self.bias, self.residual
        activation, out_dtype = self.problem["activation"], self.out_dtype
        return lambda: matmul.triton_linear(x, weight, bias, activation, residual, out_dtype,
                                            config=config)

    def reference(self) -> torch.Tensor:
        """The IR op's eager ops in fp32 (the kernel's own precision), cast once at the end."""
        up = lambda t: None if t is None else t.float()  # noqa: E731
        y = matmul.linear_reference(up(self.x), up(self.weight), up(self.bias),
                                    self.problem["activation"], up(self.residual))
        return y.to(self.out_dtype)

    def cost(self, config: Config) -> float:
        """Waves of output tiles x each tile's padded FLOPs, or the operand traffic if that
        takes longer (every tile reads its row and column bands, mostly from L2; HBM sees
        each operand once); pipelining (stages) hides part of the load latency."""
        p = self.problem
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        tiles = math.ceil(p["M"] / bm) * math.ceil(p["N"] / bn)
        k_padded = math.ceil(p["K"] / bk) * bk
        compute = _waves(tiles, self.device) * 2.0 * bm * bn * k_padded / SM_FLOPS
        itemsize, sms = matmul.dtype_itemsize(p["dtype"]), min(tiles, _sm_count(self.device))
        bands = tiles * (bm + bn) * k_padded * itemsize / (SM_L2_BYTES * sms)
        once = (p["M"] * p["K"] + p["K"] * p["N"] + p["M"] * p["N"]) * itemsize / (SM_BYTES * sms)
        memory = bands + once
        latency = 1.0 + 0.3 / config.num_stages
        penalty = _register_penalty(bm * bn / (32 * config.num_warps), 64)
        return max(compute, memory) * latency * penalty + LAUNCH_S


register_family("triton_linear", LinearTritonTunable)


def _linear(m, k, n, dtype, activation, has_bias, has_residual, device, out_dtype):
    task = linear_task(m, k, n, dtype, activation, has_bias, has_residual, device, out_dtype)
    return linear_space(task.problem_dict), task


def linear_config(m: int, k: int, n: int, dtype: torch.dtype, activation: str, has_bias: bool,
                  has_residual: bool, device: torch.device | str = "cpu",
                  out_dtype: Optional[torch.dtype] = None) -> Config:
    """The session's config for this linear (its space's default outside a session)."""
    space, task = _linear(m, k, n, dtype, activation, has_bias, has_residual, device, out_dtype)
    return choose(space, lambda: task)


def tuned_linear_config(m: int, k: int, n: int, dtype: torch.dtype, activation: str,
                        has_bias: bool, has_residual: bool, device: torch.device | str = "cpu",
                        out_dtype: Optional[torch.dtype] = None) -> Optional[Config]:
    """What lowering binds: the session's pick when it is not the untuned default, else None."""
    space, task = _linear(m, k, n, dtype, activation, has_bias, has_residual, device, out_dtype)
    return session_pick(space, lambda: task)


# --------------------------------------------------------------------------- triton_attention
MASK_KINDS = ("none", "bool", "additive")


def mask_kind_name(attn_mask: Optional[torch.Tensor]) -> str:
    if attn_mask is None:
        return "none"
    return "bool" if attn_mask.dtype == torch.bool else "additive"


def attention_task(batch: int, heads: int, kv_heads: int, len_q: int, len_k: int,
                   head_dim: int, dtype: torch.dtype, causal: bool, mask: str = "none",
                   device: torch.device | str = "cpu") -> TuningTask:
    if mask not in MASK_KINDS:
        raise ValueError(f"attention_task: mask must be one of {MASK_KINDS}, got {mask!r}")
    kind = device_kind(device)
    problem = {"B": bucket(batch), "H": int(heads), "Hkv": int(kv_heads), "Lq": bucket(len_q),
               "Lk": bucket(len_k), "D": int(head_dim), "dtype": dtype_name(dtype),
               "causal": bool(causal), "mask": mask, **_gpu_fields(kind)}
    return TuningTask.make("triton_attention", __name__, problem, _file_hash(attention.__file__),
                           kind)


def attention_space(problem: dict) -> TuningSpace:
    space = attention.TUNING_SPACE
    return dataclasses.replace(space, default=attention.choose_config(problem))


class AttentionTritonTunable(_TritonTunable):
    def __init__(self, task: TuningTask):
        super().__init__(task)
        p = self.problem
        self.space = attention_space(p)
        dtype = getattr(torch, p["dtype"])
        b, lq, lk, d = p["B"], p["Lq"], p["Lk"], p["D"]
        self.q = self.randn(b, p["H"], lq, d, dtype=dtype)
        self.k = self.randn(b, p["Hkv"], lk, d, dtype=dtype)
        self.v = self.randn(b, p["Hkv"], lk, d, dtype=dtype)
        self.mask = None
        if p["mask"] == "bool":   # random keys kept, the first always: no row left empty
            keep = torch.rand(b, 1, lq, lk, generator=self.generator) > 0.3
            keep[..., 0] = True
            self.mask = keep.to(self.device)
        elif p["mask"] == "additive":
            self.mask = self.randn(b, 1, lq, lk, dtype=dtype)

    def _run(self, fn: Callable, **extra):
        return fn(self.q, self.k, self.v, attn_mask=self.mask, is_causal=self.problem["causal"],
                  enable_gqa=self.problem["H"] != self.problem["Hkv"], **extra)

    def build(self, config: Config):
        return lambda: self._run(attention.triton_attention, config=config)

    def reference(self) -> torch.Tensor:
        return self._run(attention.attention_reference)

    def cost(self, config: Config) -> float:
        """Waves of (query block, head) programs x each one's key blocks (about half with a
        causal mask) x the two dots per key block, padding included."""
        p = self.problem
        bm, bn, bd = config["BLOCK_M"], config["BLOCK_N"], attention.head_block(p["D"])
        programs = math.ceil(p["Lq"] / bm) * p["B"] * p["H"]
        keys = min(p["Lk"], (p["Lq"] + bm) / 2) if p["causal"] else p["Lk"]
        per_program = 4.0 * bm * bd * math.ceil(keys / bn) * bn
        penalty = _register_penalty((bm * bd + bm * bn) / (32 * config.num_warps), 96)
        latency = 1.0 + 0.3 / config.num_stages
        return _waves(programs, self.device) * per_program / SM_FLOPS * penalty * latency + LAUNCH_S


register_family("triton_attention", AttentionTritonTunable)


def _attention(batch, heads, kv_heads, len_q, len_k, head_dim, dtype, causal, mask, device):
    task = attention_task(batch, heads, kv_heads, len_q, len_k, head_dim, dtype, causal, mask,
                          device)
    return attention_space(task.problem_dict), task


def attention_config(batch: int, heads: int, kv_heads: int, len_q: int, len_k: int,
                     head_dim: int, dtype: torch.dtype, causal: bool, mask: str = "none",
                     device: torch.device | str = "cpu") -> Config:
    """The session's config for this attention (its space's default outside a session)."""
    space, task = _attention(batch, heads, kv_heads, len_q, len_k, head_dim, dtype, causal, mask,
                             device)
    return choose(space, lambda: task)


def tuned_attention_config(batch: int, heads: int, kv_heads: int, len_q: int, len_k: int,
                           head_dim: int, dtype: torch.dtype, causal: bool, mask: str = "none",
                           device: torch.device | str = "cpu") -> Optional[Config]:
    """What lowering binds: the session's pick when it is not the untuned default, else None."""
    space, task = _attention(batch, heads, kv_heads, len_q, len_k, head_dim, dtype, causal, mask,
                             device)
    return session_pick(space, lambda: task)


# ------------------------------------------------------------------------------ triton_fused
def fused_space(problem: dict) -> TuningSpace:
    """The generated kernels' space plus a whole-row column: ``default_config`` (what runs
    untuned, a whole row in one tile up to 4096 columns) with every BLOCK_R and warp count,
    so the search can vary the rows per program around the default's tile width."""
    space = fused_triton.TUNING_SPACE
    default = fused_triton.default_config(problem["rows"], problem["N"])
    width = default["BLOCK_N"]
    column = [Config.of(num_warps=w, BLOCK_R=r, BLOCK_N=width)
              for r in sorted({c["BLOCK_R"] for c in space.configs})
              for w in sorted({c.num_warps for c in space.configs})]
    configs = tuple(dict.fromkeys([*space.configs, *column, default]))
    return dataclasses.replace(space, configs=configs, default=default)


def fused_task(program: RowProgram, shapes: list[tuple], device: torch.device | str = "cpu"
               ) -> TuningTask:
    """``shapes``: (shape, dtype) of the group's tensor inputs at the example sizes."""
    rows, ncols = rows_and_cols(program, shapes)
    name = f"fused_{program.digest()}"
    problem = {"rows": bucket(rows), "N": ncols}
    return TuningTask.make("triton_fused", __name__, problem,
                           source_hash(fused_triton.generate_source(program, name)),
                           device_kind(device), payload=(program, shapes))


class FusedTritonTunable(_TritonTunable):
    """The group's kernel at its example shapes; the reference is the default config's output."""

    def __init__(self, task: TuningTask):
        super().__init__(task)
        self.program, shapes = task.payload
        self.space = fused_space(self.problem)
        self.rows, self.ncols = rows_and_cols(self.program, shapes)
        tensors = iter(t.to(self.device) for t in random_inputs(shapes))
        positions = set(self.program.tensor_args)   # SymInt arguments are ignored: pass 0
        self.args = [next(tensors) if k in positions else 0 for k in range(self.program.n_args)]

    def build(self, config: Config):
        kernel = fused_triton.TritonFusedKernel(self.program, config)
        args = self.args
        return lambda: kernel(*args)

    def cost(self, config: Config) -> float:
        """Waves of row blocks x the elements each program touches (padding included, once per
        reduction phase when the row does not fit one tile), ~8 elements a thread ideal."""
        block_r, block_n = config["BLOCK_R"], config["BLOCK_N"]
        programs = math.ceil(self.rows / block_r)
        passes = 1 if self.ncols <= block_n else len(self.program.reductions()) + 1
        elements = block_r * math.ceil(self.ncols / block_n) * block_n * passes
        penalty = _register_penalty(block_r * block_n / (32 * config.num_warps), 8)
        return _waves(programs, self.device) * elements * 4 / SM_BYTES * penalty + LAUNCH_S


register_family("triton_fused", FusedTritonTunable)


def example_inputs(program: RowProgram, gm: fx.GraphModule) -> Optional[tuple[list, str]]:
    """(shape, dtype) of the group's tensor inputs at the example sizes and their device, or
    None when a size has no example value."""
    shapes = example_shapes(program, gm)
    if shapes is None:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return shapes, device_kind(placeholders[program.tensor_args[0]].meta["val"].device)


def tuned_fused_config(program: RowProgram, gm: fx.GraphModule) -> Optional[Config]:
    """The session's config for a fusion group's kernel, or None (untuned: the kernel picks
    ``default_config`` per call). A tuned kernel keeps its config for every shape."""
    active = current()
    if active is None or active.mode == "off":
        return None
    found = example_inputs(program, gm)
    if found is None:
        return None
    task = fused_task(program, *found)
    return session_pick(fused_space(task.problem_dict), lambda: task)


def compile_tuned_fused(gm: fx.GraphModule) -> fused_triton.TritonFusedKernel:
    """A fusion group's Triton kernel with the session's config (lowering calls this)."""
    program = build_program(gm)
    return fused_triton.TritonFusedKernel(program, tuned_fused_config(program, gm))
