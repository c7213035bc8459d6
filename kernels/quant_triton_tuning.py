"""The autotuner's view of the quantized Triton kernels (``kernels/quant_triton.py``): one family,
``triton_quant_linear``, whose problem's row bucket picks the space (the split-K GEMV's up to
``GEMV_MAX_ROWS`` rows, the dequant-fused matmul's above), as ``kernels/triton_tuning.py`` does
for the dense kernels: a task (sizes bucketed), the per-problem space (its default being what runs
untuned), a :class:`Tunable` that launches the real kernel on random codes of the task's format,
and a roofline-style ``cost`` used only to rank.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from fxforge.irgraph.weight_format import implemented_format, pack_nibbles
from fxforge.kernels import quant_triton
from fxforge.kernels.quant_triton_space import choose_config, gemv_splits, space_for
from fxforge.kernels.triton_tuning import (LAUNCH_S, SM_BYTES, SM_COUNT, SM_FLOPS, _file_hash,
                                           _gpu_fields, _TritonTunable, _waves, device_kind,
                                           dtype_name, session_pick)
from fxforge.kernels.tuning import (Config, TuningSpace, TuningTask, bucket, choose, compare_outputs,
                                   register_family)


def quant_task(m: int, k: int, n: int, weight_format: str, dtype: torch.dtype, activation: str,
               has_bias: bool, has_residual: bool, device: torch.device | str = "cpu",
               out_dtype: Optional[torch.dtype] = None) -> TuningTask:
    kind = device_kind(device)
    problem = {"M": bucket(m), "K": int(k), "N": int(n), "format": weight_format,
               "dtype": dtype_name(dtype), "out": dtype_name(out_dtype or torch.float32),
               "activation": activation, "bias": bool(has_bias), "residual": bool(has_residual),
               **_gpu_fields(kind)}
    return TuningTask.make("triton_quant_linear", __name__, problem,
                           _file_hash(quant_triton.__file__), kind)


def quant_space(problem: dict) -> TuningSpace:
    """The GEMV's or the matmul's space, with ``choose_config``'s pick as its default."""
    return dataclasses.replace(space_for(problem), default=choose_config(problem))


def random_quantized(k: int, n: int, weight_format: str, generator: torch.Generator) -> tuple:
    """(codes, scales, offsets) of ``weight_format`` in the IR's ``[rows, N]`` orientation, as
    transposed views of ``[N, rows]`` storage (how the quantize pass stores them); scales sized so
    that a unit-variance x gives outputs of order one."""
    fmt = implemented_format(weight_format)
    rows = 1 if fmt.group == 0 else k // fmt.group
    if fmt.bits == 4:
        values = torch.randint(0, 16, (k, n), generator=generator)
        codes = pack_nibbles(values).t().contiguous().t()
        scale = 2.0 / (15 * k ** 0.5)
    else:
        codes = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8).t()
        scale = 1.7 / (127 * max(k, 1) ** 0.5)
    scales = (torch.rand(n, rows, generator=generator) * scale + scale / 2).half().t()
    offsets = None
    if "offsets" in fmt.extras:
        offsets = (-7.5 * scales.float() * (1 + 0.1 * torch.randn(rows, n, generator=generator))).half()
    return codes, scales, offsets


class QuantTritonTunable(_TritonTunable):
    def __init__(self, task: TuningTask):
        super().__init__(task)
        p = self.problem
        self.space = quant_space(p)
        m, k, n = p["M"], p["K"], p["N"]
        dtype, self.out_dtype = getattr(torch, p["dtype"]), getattr(torch, p["out"])
        self.x = self.randn(m, k, dtype=dtype)
        codes, scales, offsets = random_quantized(k, n, p["format"], self.generator)
        self.codes, self.scales = codes.to(self.device), scales.to(self.device)
        self.offsets = offsets.to(self.device) if offsets is not None else None
        self.bias = self.randn(n, dtype=dtype) if p["bias"] else None
        self.residual = self.randn(m, n, dtype=dtype) if p["residual"] else None

    def build(self, config: Config):
        args = (self.x, self.codes, self.scales, self.offsets, self.problem["format"], self.bias,
                self.problem["activation"], self.residual, self.out_dtype)
        return lambda: quant_triton.triton_quant_linear(*args, config=config)

    def reference(self) -> torch.Tensor:
        """The IR op on fp32 operands (the kernel's own precision), cast once at the end."""
        up = lambda t: None if t is None else t.float()  # noqa: E731
        y = torch.ops.fxforge.linear(up(self.x), self.codes, up(self.bias), self.problem["activation"],
                                     up(self.residual), None, self.problem["format"], self.scales,
                                     self.offsets)
        return y.to(self.out_dtype)

    def check(self, output, expected):
        """At the tolerance of the dot's dtype: half x dots the weight rounded to x's dtype."""
        dtype = getattr(torch, self.problem["dtype"])
        if dtype != torch.float32 and output.dtype == torch.float32:
            return compare_outputs(output.to(dtype), expected.to(dtype))
        return compare_outputs(output, expected)

    def cost(self, config: Config) -> float:
        """Waves of programs x each one's bytes (codes, scales and x; the GEMV's partial sums) or
        FLOPs (the matmul's padded tiles), whichever takes longer."""
        p = self.problem
        fmt = implemented_format(p["format"])
        weight_bytes = fmt.bits_per_weight / 8
        params = config.kwargs()
        if "SPLIT_K" in params:
            per_split, splits = gemv_splits(p["K"], params["BLOCK_K"], params["SPLIT_K"])
            programs = p["M"] * math.ceil(p["N"] / params["BLOCK_N"]) * splits
            work = per_split * params["BLOCK_N"] * weight_bytes / SM_BYTES
            # the second pass: a launch, the partial sums written and read back
            extra = LAUNCH_S + splits * p["M"] * p["N"] * 8 / (SM_BYTES * SM_COUNT) if splits > 1 else 0.0
            return _waves(programs, self.device) * work + extra + LAUNCH_S
        bm, bn, bk = params["BLOCK_M"], params["BLOCK_N"], params["BLOCK_K"]
        tiles = math.ceil(p["M"] / bm) * math.ceil(p["N"] / bn)
        k_padded = math.ceil(p["K"] / bk) * bk
        compute = 2.0 * bm * bn * k_padded / SM_FLOPS
        memory = bn * k_padded * weight_bytes / SM_BYTES
        return _waves(tiles, self.device) * max(compute, memory) * (1.0 + 0.3 / config.num_stages) \
            + LAUNCH_S


register_family("triton_quant_linear", QuantTritonTunable)


def _quant(m, k, n, weight_format, dtype, activation, has_bias, has_residual, device, out_dtype):
    task = quant_task(m, k, n, weight_format, dtype, activation, has_bias, has_residual, device,
                      out_dtype)
    return quant_space(task.problem_dict), task


def quant_config(m: int, k: int, n: int, weight_format: str, dtype: torch.dtype, activation: str,
                 has_bias: bool, has_residual: bool, device: torch.device | str = "cpu",
                 out_dtype: Optional[torch.dtype] = None) -> Config:
    """The session's config for this quantized linear (its space's default outside a session)."""
    space, task = _quant(m, k, n, weight_format, dtype, activation, has_bias, has_residual, device,
                         out_dtype)
    return choose(space, lambda: task)


def tuned_quant_config(m: int, k: int, n: int, weight_format: str, dtype: torch.dtype,
                       activation: str, has_bias: bool, has_residual: bool,
                       device: torch.device | str = "cpu",
                       out_dtype: Optional[torch.dtype] = None) -> Optional[tuple[int, Config]]:
    """What lowering binds: (row bucket, the session's pick) when that is not the untuned
    default, else None."""
    space, task = _quant(m, k, n, weight_format, dtype, activation, has_bias, has_residual, device,
                         out_dtype)
    config = session_pick(space, lambda: task)
    return None if config is None else (bucket(m), config)
