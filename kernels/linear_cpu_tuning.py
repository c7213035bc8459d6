"""Autotuning of the CPU linear: the task a ``PackedLinear`` is tuned as, how the tuner builds and
times its candidates (``kernels/linear_cpu.py``: the implementations and their tuning space), and
``tuned_linear``, which the CPU backend calls at lowering."""
from __future__ import annotations

import functools
import hashlib
import itertools
from pathlib import Path
from typing import Optional

import torch

from fxforge.kernels.cpu_isa import MatmulPath, choose_matmul_path
from fxforge.kernels.linear_cpu import LAYOUTS, PackedLinear, candidate_of, linear_cpu_space
from fxforge.kernels.tuning import Config, Tunable, TuningTask, bucket, choose, register_family

# What a tuned pick depends on: the implementations' code (a changed kernel invalidates picks).
_SOURCES = ("linear_cpu.py", "gemm_cpu.py", "gemv_cpu.py", "gemv_cpp.py", "linear_cpu_tuning.py")


@functools.lru_cache(maxsize=1)
def _module_source_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def linear_task(m: int, k: int, n: int, compute_dtype: torch.dtype, activation: str,
                has_bias: bool, has_residual: bool, weight_format: str = "dense") -> TuningTask:
    problem = {"M": bucket(m), "K": k, "N": n, "dtype": str(compute_dtype).split(".")[-1],
               "activation": activation, "bias": has_bias, "residual": has_residual}
    if weight_format != "dense":   # another storage, another speed (dense keys stay as they were)
        problem["weight_format"] = weight_format
    return TuningTask.make("linear_cpu", __name__, problem, _module_source_hash())


# Candidates are timed cycling over copies of the weight that together exceed the last-level
# cache, as in a model, where each layer's weight arrives from memory: timed alone, one small
# weight stays in L1/L2 and favours paths that lose in a model (seen: oneDNN/MKL 1.1-1.3x
# faster than aten at M=1 in isolation, 5% slower in the small GPT's decode step).
WORKING_SET_BYTES = 32 << 20
MAX_COPIES = 64


class LinearCpuTunable(Tunable):
    """Random operands of the task's shape (timing does not depend on the values)."""

    parallel_build = False   # packing is cheap; concurrent oneDNN reorders buy nothing

    def __init__(self, task: TuningTask):
        super().__init__(task)
        p = self.problem
        self.dtype = getattr(torch, p["dtype"])
        self.weight_format = p.get("weight_format", "dense")
        self.space = linear_cpu_space(p["M"], p["K"], p["N"], self.dtype)
        g = torch.Generator().manual_seed(1234)
        copies = max(1, min(MAX_COPIES, WORKING_SET_BYTES // (4 * p["K"] * p["N"])))
        dtype = self.dtype     # the operands arrive in the compute dtype the task was made for
        self.weights = [(torch.randn(p["K"], p["N"], generator=g) / p["K"] ** 0.5).to(dtype)
                        for _ in range(copies)]
        self.bias = torch.randn(p["N"], generator=g).to(dtype) if p["bias"] else None
        self.x = torch.randn(p["M"], p["K"], generator=g).to(dtype)
        self.residual = torch.randn(p["M"], p["N"], generator=g).to(dtype) if p["residual"] else None

    def build(self, config: Config):
        path = (MatmulPath("fp32", "fp32 GEMM", torch.float32) if config["fp32"]
                else choose_matmul_path(self.dtype))
        linears = [PackedLinear(weight, self.bias, self.problem["activation"],
                                self.residual is not None, path=path, candidate=candidate_of(config),
                                batch_hint=self.problem["M"], threads=config["threads"],
                                layout=LAYOUTS[config["layout"]], block=config.kwargs().get("block", 0),
                                weight_format=self.weight_format)
                   for weight in self.weights]
        x, residual, turn = self.x, self.residual, itertools.count()
        if len(linears) == 1:
            return (lambda: linears[0](x, residual)) if residual is not None else \
                (lambda: linears[0](x))

        def run():   # the first call (the correctness check) uses weights[0], the reference's
            linear = linears[next(turn) % len(linears)]
            return linear(x, residual) if residual is not None else linear(x)
        return run

    def reference(self):
        return torch.ops.fxforge.linear(self.x, self.weights[0], self.bias, self.problem["activation"],
                                        self.residual, None, self.weight_format)

    def cost(self, config: Config) -> float:
        """Roofline-ish: GEMM flops over the threads' throughput, plus each path's fixed cost
        and a fork/join cost per extra thread (the figures measured on the dev box)."""
        p = self.problem
        flops = 2.0 * p["M"] * p["K"] * p["N"]
        threads = config["threads"]
        fixed = {"onednn": 40e-6, "mkl": 15e-6, "aten": 5e-6, "gemv": 3e-6,
                 "tiled": 3e-6}[candidate_of(config)]
        if candidate_of(config) == "gemv":   # bandwidth-bound: ~12 GB/s of weights per thread
            return 4.0 * p["K"] * p["N"] / (12e9 * threads) + fixed + 3e-6 * (threads - 1)
        return flops / (30e9 * threads) + fixed + 3e-6 * (threads - 1) + 1e-7 * config["layout"]


register_family("linear_cpu", LinearCpuTunable)


def tuned_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                 has_residual: bool, out_dtype: Optional[torch.dtype], rows: int,
                 varying_rows: bool = False, weight_format: str = "dense") -> PackedLinear:
    """A PackedLinear with the config the tuning session picks (the default outside one);
    ``varying_rows``: M is symbolic and ``rows`` only the size to tune and pack for;
    ``weight_format``: the op's (the kernel reads it from there, never from the values)."""
    path = choose_matmul_path(weight.dtype)
    k, n = weight.shape
    space = linear_cpu_space(rows, k, n, path.compute_dtype)
    config = choose(space, lambda: linear_task(rows, k, n, path.compute_dtype, activation,
                                               bias is not None, has_residual, weight_format))
    if config["fp32"]:
        path = MatmulPath("fp32", f"tuned: an fp32 GEMM beat {path.name} for this shape",
                          torch.float32)
    return PackedLinear(weight, bias, activation, has_residual, out_dtype, path=path,
                        candidate=candidate_of(config), batch_hint=rows, threads=config["threads"],
                        layout=LAYOUTS[config["layout"]], block=config.kwargs().get("block", 0),
                        varying_rows=varying_rows, weight_format=weight_format)
