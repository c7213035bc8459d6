"""CPU linear with its epilogue: ``y = act(x @ weight + bias) + residual`` (``fxforge::linear``).

A :class:`PackedLinear` is built once, at compile time, from a constant ``weight`` ([K, N], the
second operand of ``mm``) and keeps the weight in the layout its implementation wants, so no call
pays for a transpose or a reorder. Three implementations (the autotuner picks one per shape
through :data:`LINEAR_CPU_SPACE`; :func:`default_candidate` is the measured rule without it):

``onednn``  ``mkldnn._linear_pointwise`` on a weight reordered once by
            ``mkldnn._reorder_linear_weight``; the activation (and, with no activation, the
            residual add) run as oneDNN post-ops inside the GEMM.
``mkl``     MKL's packed GEMM (``mkl._mkl_linear`` on ``mkl._mkl_reorder_linear_weight``). The
            pack is made for one M (``batch_hint``); a call with another M runs ``linear`` on the
            original weight. fp32 only. The epilogue runs in place on the output.
``aten``    ``addmm``/``mm`` on a contiguous [K, N] copy of the weight, epilogue in place.
``tiled``   fxforge's register-tiled C++ GEMM (``kernels/gemm_cpu.py``): the weight packed in
            16-column panels, bias, activation and residual applied to each tile before its store.
``gemv``    fxforge's C++ GEMV (``kernels/gemv_cpu.py``), for at most GEMV_MAX_M rows.

The reference (test oracle) is ``torch.ops.fxforge.linear`` in ``irgraph/ops.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxforge.irgraph.ops import ACTIVATIONS
from fxforge.irgraph.weight_format import decode, not_implemented_by, weight_format as format_named
from fxforge.kernels.activations import BY_NAME
from fxforge.kernels.cpu_isa import MatmulPath, choose_matmul_path
from fxforge.kernels.gemm_cpu import BLOCKS, TiledLinear, gemm_unavailable
from fxforge.kernels.gemv_cpu import (GEMV_MAX_M, STORAGE, GemvLinear, epilogue_,
                                      epilogue_available, gemv_unavailable)
from fxforge.kernels.tuning import Config, Problem, TuningSpace



def activate_(y: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply ``activation`` to ``y`` in place (the same ATen kernels as the reference)."""
    if activation not in BY_NAME:
        raise ValueError(f"unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    BY_NAME[activation].aten_(y)
    return y


def _describe_epilogue(activation: str, has_residual: bool) -> str:
    steps = ([activation] if activation != "none" else []) + (["residual add_"] if has_residual else [])
    where = "one vectorized C++ pass" if activation != "none" and epilogue_available() else "in place"
    return f", epilogue {where}: {' then '.join(steps)}" if steps else ""


def _epilogue_(y: torch.Tensor, activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The activation and residual add after a library GEMM: one vectorized C++ pass
    (``gemv_cpu.epilogue_``: ATen's gelu_/silu_ cost ~1.5-2.2 ns an element on a 2-core Zen 1),
    or ATen's in-place ops where that kernel does not apply."""
    if activation != "none" and epilogue_(y, activation, residual):
        return y
    activate_(y, activation)
    return y.add_(residual) if residual is not None else y


class _OneDNNLinear:
    name = "onednn"

    def __init__(self, weight_nk: torch.Tensor, bias, activation: str, batch_hint: int):
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight_nk, batch_hint)
        self.bias, self.activation = bias, activation
        self.post_op = BY_NAME[activation].onednn

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        if residual is not None and self.activation == "none":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed_weight,
                                                             self.bias, "add")
        attr, algorithm = self.post_op
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, attr, [], algorithm)
        return y.add_(residual) if residual is not None else y

    def describe(self, dtype_name: str, has_residual: bool) -> str:
        text = f"oneDNN {dtype_name} linear, prepacked"
        attr, algorithm = self.post_op
        if self.activation != "none":
            text += f", post-op {attr}" + (" (tanh)" if algorithm == "tanh" else "")
        if has_residual:
            text += (", residual: binary post-op add" if self.activation == "none"
                     else ", residual: add_ after")
        return text


class _MKLLinear:
    name = "mkl"

    def __init__(self, weight_nk: torch.Tensor, bias, activation: str, batch_hint: int):
        self.weight_nk = weight_nk  # _mkl_linear runs linear on it when M != batch_hint
        self.packed_weight = torch.ops.mkl._mkl_reorder_linear_weight(weight_nk, batch_hint)
        self.bias, self.activation, self.batch_hint = bias, activation, batch_hint

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = torch.ops.mkl._mkl_linear(x.contiguous(), self.packed_weight, self.weight_nk,
                                      self.bias, self.batch_hint)
        return _epilogue_(y, self.activation, residual)

    def describe(self, dtype_name: str, has_residual: bool) -> str:
        return (f"MKL packed {dtype_name} GEMM (packed for M={self.batch_hint}; other M unpacked)"
                + _describe_epilogue(self.activation, has_residual))


class _AtenLinear:
    """``layout`` "kn": the weight stored [K, N] (BLAS "nn"); "nk": stored [N, K] and read
    transposed (BLAS "nt", as ``F.linear`` does): which one is faster depends on the shape."""
    name = "aten"

    def __init__(self, weight_nk: torch.Tensor, bias, activation: str, batch_hint: int,
                 layout: str = "kn"):
        self.layout = layout
        self.weight_kn = weight_nk.t().contiguous() if layout == "kn" else weight_nk.t()
        self.bias, self.activation = bias, activation

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = (torch.addmm(self.bias, x, self.weight_kn) if self.bias is not None
             else torch.mm(x, self.weight_kn))
        return _epilogue_(y, self.activation, residual)

    def describe(self, dtype_name: str, has_residual: bool) -> str:
        op = "addmm" if self.bias is not None else "mm"
        stored = "pre-transposed contiguous [K,N]" if self.layout == "kn" else "kept [N,K]"
        return (f"aten {op} {dtype_name}, weight {stored}"
                + _describe_epilogue(self.activation, has_residual))


class _GemvLinear(GemvLinear):
    """The C++ GEMV of ``kernels/gemv_cpu.py`` as a candidate (for M <= GEMV_MAX_M)."""
    name = "gemv"

    def __init__(self, weight_nk: torch.Tensor, bias, activation: str, batch_hint: int,
                 weight_format: str = "dense"):
        super().__init__(weight_nk, bias, activation, weight_format=weight_format)


class _TiledLinear(TiledLinear):
    """The tiled C++ GEMM of ``kernels/gemm_cpu.py`` as a candidate; ``block``: its blocking."""

    def __init__(self, weight_nk: torch.Tensor, bias, activation: str, batch_hint: int,
                 block: int = 0, weight_format: str = "dense"):
        super().__init__(weight_nk, bias, activation, block, weight_format)


# New candidates go at the end: a tuned config names its candidate by index.
_IMPLEMENTATIONS = {impl.name: impl for impl in (_OneDNNLinear, _MKLLinear, _AtenLinear,
                                                 _GemvLinear, _TiledLinear)}
CANDIDATES: tuple[str, ...] = tuple(_IMPLEMENTATIONS)
# Candidates that store a weight format themselves (gemv_cpu.STORAGE); the libraries get the
# weight decoded to its values (irgraph/weight_format.py) at pack time.
_STORE_FORMATS = ("gemv", "tiled")


def unavailable_reason(candidate: str, compute_dtype: torch.dtype) -> Optional[str]:
    """Why ``candidate`` cannot run ``compute_dtype`` matmuls here, or None if it can."""
    if candidate not in _IMPLEMENTATIONS:
        return f"unknown linear candidate {candidate!r}; one of {list(CANDIDATES)}"
    if compute_dtype not in (torch.float32, torch.bfloat16):
        return f"{candidate}: no {compute_dtype} linear (fp32 and bf16 only)"
    if candidate == "onednn":
        if not torch.backends.mkldnn.is_available():
            return "onednn: this torch is built without oneDNN"
        if compute_dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "onednn: oneDNN refuses bf16 on this CPU (needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)"
    if candidate == "mkl":
        if not torch.backends.mkl.is_available():
            return "mkl: this torch is built without MKL"
        if compute_dtype != torch.float32:
            return "mkl: the packed MKL GEMM is fp32 only"
    if candidate == "gemv":
        if compute_dtype != torch.float32:
            return "gemv: the C++ GEMV is fp32 only"
        return gemv_unavailable()
    if candidate == "tiled":
        if compute_dtype != torch.float32:
            return "tiled: the C++ GEMM is fp32 only"
        return gemm_unavailable()
    return None


# Below this M, oneDNN's fixed cost per call (~50-100 us on a 2-core Zen 1: it sets up the primitive each
# call) outweighs the GEMM; aten addmm on the pre-transposed weight wins.
ONEDNN_MIN_M = 8
# Below this output width oneDNN's blocking gains nothing over MKL's addmm and its fixed cost
# shows (M=128, 2 threads, a quiet 2-core Zen 1: N=384 aten 210 us vs oneDNN 243; N=512 405 vs 415;
# N=128 219 vs 255); from here on it wins (N=8192: 7.4 ms vs 9.7).
ONEDNN_MIN_N = 2048
# The default takes the GEMV for one row only: from two rows the tiled GEMM is faster, and at
# one they tie on fp32 weights while the GEMV is 3-5% ahead on bf16-stored ones (SmolLM2's
# shapes, weights cycled past the cache, 2 threads: fp32 M=2 tiled 465 us vs GEMV 490, M=4
# 525 vs 662; bf16-stored M=4 302 vs 480, M=1 273 vs 260).
GEMV_DEFAULT_ROWS = 1


def default_candidate(m: int, k: int, n: int, compute_dtype: torch.dtype = torch.float32) -> str:
    """The measured rule when nothing is autotuned: the C++ GEMV for GEMV_DEFAULT_ROWS rows,
    the tiled C++ GEMM above; where those cannot run (bf16 math, no compiler) aten for small M,
    oneDNN from ONEDNN_MIN_M rows and ONEDNN_MIN_N columns.

    Measured on the 2-core AVX2 Zen 1 box (``bench/linear_cpu.py``: weights cycled past the
    last-level cache as in a model, 2 threads, medians of 9 interleaved rounds): tiled over
    aten 1.15-1.20x on the small GPT's linears, 1.13-1.28x on the GPT-2/Llama configs',
    1.21-1.42x on SmolLM2's, 2.2x at 8 rows; from 256 rows the three are within a few percent
    where the GEMM runs at peak (oneDNN 2% ahead at [512,576]x[576,3072], 1.5x behind at
    [256,256]x[256,1024]). Without the C++ kernels: M=1 aten 0.8-0.9x of eager at K, N <= 1024
    and 1.7x at N=8192, oneDNN 0.6-0.9x; M >= 8 oneDNN ties aten at K, N <= 1024 and wins at
    N=8192.
    """
    small = m < ONEDNN_MIN_M or n < ONEDNN_MIN_N
    preferred = ["aten", "onednn"] if small else ["onednn", "aten"]
    preferred.insert(0, "gemv" if m <= GEMV_DEFAULT_ROWS else "tiled")
    for name in preferred + list(CANDIDATES):
        if unavailable_reason(name, compute_dtype) is None:
            return name
    raise RuntimeError("no CPU linear candidate can run here")  # aten always can


LAYOUTS = ("kn", "nk")


def thread_counts(limit: Optional[int] = None) -> list[int]:
    """1, 2, 4, ... below ``limit`` (torch's thread count), and ``limit`` itself."""
    limit = limit or torch.get_num_threads()
    counts = [1 << i for i in range(limit.bit_length()) if (1 << i) < limit]
    return counts + [limit]


def _prune(config: Config, problem: Problem) -> Optional[str]:
    index = config["candidate"]
    if not 0 <= index < len(CANDIDATES):
        return f"candidate index {index} out of range"
    if config.kwargs().get("layout", 0) and CANDIDATES[index] != "aten":
        return "the weight layout is a knob of the aten candidate only"
    if config.kwargs().get("block", 0) and CANDIDATES[index] != "tiled":
        return "the blocking is a knob of the tiled candidate only"
    if not 0 <= config.kwargs().get("block", 0) < len(BLOCKS):
        return f"block index {config['block']} out of range"
    if CANDIDATES[index] == "gemv" and problem.get("M", 1) > GEMV_MAX_M:
        return f"gemv: more than {GEMV_MAX_M} rows"
    if config.kwargs().get("threads", 1) > torch.get_num_threads():
        return f"more threads than torch's {torch.get_num_threads()}"
    dtype = problem.get("dtype", torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if config.kwargs().get("fp32"):
        if dtype != torch.bfloat16:
            return "an fp32 GEMM is a choice for bf16 linears only"
        dtype = torch.float32
    return unavailable_reason(CANDIDATES[index], dtype)


def config_for(candidate: str, threads: Optional[int] = None, layout: str = "kn",
               fp32: bool = False, block: int = 0) -> Config:
    """``fp32``: run a bf16 linear's GEMM in fp32 (more exact; for some shapes faster);
    ``block``: the tiled GEMM's (kc, mc) blocking, an index into ``gemm_cpu.BLOCKS``."""
    return Config.of(candidate=CANDIDATES.index(candidate),
                     threads=threads or torch.get_num_threads(), layout=LAYOUTS.index(layout),
                     fp32=int(fp32), block=block)


def candidate_of(config: Config) -> str:
    return CANDIDATES[config["candidate"]]


def linear_cpu_space(m: int = 128, k: int = 1024, n: int = 1024,
                     compute_dtype: torch.dtype = torch.float32) -> TuningSpace:
    """Implementation x thread count (x weight layout for aten, x blocking for tiled; x bf16 or
    fp32 GEMM where the path is bf16); the default is :func:`default_candidate`'s measured rule
    at all threads."""
    precisions = (False, True) if compute_dtype == torch.bfloat16 else (False,)
    configs = tuple(config_for(name, threads, layout, fp32, block) for name in CANDIDATES
                    for threads in thread_counts()
                    for layout in (LAYOUTS if name == "aten" else LAYOUTS[:1])
                    for block in (range(len(BLOCKS)) if name == "tiled" else (0,))
                    for fp32 in precisions)
    default = config_for(default_candidate(m, k, n, compute_dtype))
    return TuningSpace("linear_cpu", configs, default=default, prune=_prune, describe=describe_config)


def describe_config(config: Config) -> str:
    layout = f" {LAYOUTS[config['layout']]}" if candidate_of(config) == "aten" else ""
    if candidate_of(config) == "tiled":
        layout = " kc={} mc={}".format(*BLOCKS[config.kwargs().get("block", 0)])
    fp32 = ", fp32 GEMM" if config.kwargs().get("fp32") else ""
    return f"{candidate_of(config)}{layout}, {config['threads']} thr{fp32}"


LINEAR_CPU_SPACE = linear_cpu_space()


class PackedLinear:
    """``fxforge::linear`` with a constant weight, prepared once for one implementation.

    ``weight`` is [K, N]; ``bias`` [N] or None; ``activation`` a name in ``ACTIVATIONS``;
    ``has_residual`` whether calls pass a residual [M, N]; ``path`` the matmul path (default:
    ``choose_matmul_path(weight.dtype)``); ``candidate`` one of :data:`CANDIDATES` (default:
    :func:`default_candidate` for ``batch_hint`` rows); ``batch_hint`` the M to pack for.
    ``weight_format``: the op's (``irgraph/weight_format.py``): "dense" or "bf16" (the C++
    kernels store bf16 weights in bf16; the libraries get the rounded values); another is a
    ValueError naming it. ``varying_rows``: M changes at run time (a KV-cache step graph runs
    the prompt, then one token per call), so few-row calls may take the C++ GEMV (see
    :meth:`_few_rows`).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 activation: str = "none", has_residual: bool = False,
                 out_dtype: Optional[torch.dtype] = None, *, path: Optional[MatmulPath] = None,
                 candidate: Optional[str] = None, batch_hint: int = 1, threads: int = 0,
                 layout: str = "kn", block: int = 0, varying_rows: bool = False,
                 weight_format: str = "dense"):
        if format_named(weight_format).name not in STORAGE:
            raise not_implemented_by("PackedLinear (CPU linear)", weight_format, STORAGE)
        if weight.dim() != 2 or (bias is not None and list(bias.shape) != [weight.shape[1]]):
            raise ValueError(f"PackedLinear: weight {list(weight.shape)} must be [K, N] and bias [N]")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
        self.path = path if path is not None else choose_matmul_path(weight.dtype)
        self.compute_dtype = self.path.compute_dtype
        if self.compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"PackedLinear runs float paths; {self.path.name} is the quantized "
                             "linear's path")
        self.k, self.n = weight.shape
        self.activation, self.has_residual, self.out_dtype = activation, has_residual, out_dtype
        self.weight_dtype = weight.dtype
        self.candidate = candidate or default_candidate(batch_hint, self.k, self.n, self.compute_dtype)
        reason = unavailable_reason(self.candidate, self.compute_dtype)
        if reason is not None:
            raise ValueError(f"PackedLinear: {reason}")
        self.weight_format = weight_format
        weight_nk = weight.detach().t().to(self.compute_dtype).contiguous()
        bias = bias.detach().to(self.compute_dtype).contiguous() if bias is not None else None
        extra = ({"layout": layout} if self.candidate == "aten" else
                 {"block": block} if self.candidate == "tiled" else {})
        if self.candidate in _STORE_FORMATS:
            extra["weight_format"] = weight_format
        stored = weight_nk if self.candidate in _STORE_FORMATS else decode(weight_nk, weight_format)
        self.impl = _IMPLEMENTATIONS[self.candidate](stored, bias, activation, max(1, batch_hint),
                                                     **extra)
        self.few_rows, self.few_rows_max = (self._few_rows(weight_nk, bias, activation)
                                            if varying_rows else (None, 0))
        self.threads = threads  # 0: torch's; else this many for this GEMM (the tuner's knob)

    def _few_rows(self, weight_nk: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: str) -> tuple[Optional[GemvLinear], int]:
        """The GEMV for a varying-M linear's few-row calls (decode steps) and the most rows it
        takes, or (None, 0). The tiled GEMM serves them itself, unless its weight is stored in
        bf16: then the GEMV reads the same packed copy (``kernels/shared_packs.py``) and is
        3-5% faster at one row. Beside aten or oneDNN the GEMV (with its own copy) takes up to
        GEMV_MAX_M rows, 2x their speed there."""
        if self.candidate == "gemv" or unavailable_reason("gemv", self.compute_dtype) is not None:
            return None, 0
        if self.candidate != "tiled":
            return GemvLinear(weight_nk, bias, activation, weight_format=self.weight_format), GEMV_MAX_M
        if self.impl.storage != torch.bfloat16:
            return None, 0
        gemv = GemvLinear(weight_nk, bias, activation, bf16_pack=self.impl.panels,
                          weight_format=self.weight_format)
        return gemv, GEMV_DEFAULT_ROWS

    def _result_dtype(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
        """The dtype ``fxforge::linear`` returns (its fake implementation's promotion rule)."""
        if self.out_dtype is not None:
            return self.out_dtype
        dtype = x.dtype if x.dtype == self.weight_dtype else torch.promote_types(x.dtype,
                                                                                 self.weight_dtype)
        if residual is not None and residual.dtype != dtype:
            dtype = torch.promote_types(dtype, residual.dtype)
        return dtype

    def _check(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"PackedLinear: x {list(x.shape)} is not [M, K={self.k}]")
        if (residual is not None) != self.has_residual:
            raise ValueError(f"PackedLinear was built with has_residual={self.has_residual}")
        if residual is not None and residual.shape != (x.shape[0], self.n):
            raise ValueError(f"PackedLinear: residual {list(residual.shape)} is not "
                             f"[{x.shape[0]}, {self.n}]")

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Kept lean: at M=1 the GEMM itself takes ~30 us here, so every Python step shows.
        self._check(x, residual)
        result_dtype = self._result_dtype(x, residual)
        compute = self.compute_dtype
        if residual is not None and residual.dtype != compute:
            residual = residual.to(compute)
        impl = self.few_rows if self.few_rows is not None and x.shape[0] <= self.few_rows_max \
            else self.impl
        if self.threads and self.threads != torch.get_num_threads():
            y = self._call_with_threads(impl, x if x.dtype == compute else x.to(compute), residual)
        else:
            y = impl(x if x.dtype == compute else x.to(compute), residual)
        return y if y.dtype == result_dtype else y.to(result_dtype)

    def _call_with_threads(self, impl, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """The tuned thread count: an argument of the C++ kernels, which then touch no shared
        state; the libraries read torch's, so it is set around their call. That setting is per
        Python thread for OpenMP, but it is also the count a thread that has not yet run a
        parallel op starts with, so other threads starting meanwhile may inherit it."""
        if isinstance(impl, (GemvLinear, TiledLinear)):
            return impl(x, residual, threads=self.threads)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)   # ~0.3 us; restored even if the GEMM raises
        try:
            return impl(x, residual)
        finally:
            torch.set_num_threads(previous)

    def describe(self) -> str:
        dtype_name = "fp32" if self.compute_dtype == torch.float32 else "bf16"
        text = self.impl.describe(dtype_name, self.has_residual)
        if self.few_rows is not None:
            text += f"; calls of <= {self.few_rows_max} rows: " + self.few_rows.describe(dtype_name,
                                                                                 self.has_residual)
        if self.threads and self.threads != torch.get_num_threads():
            text += f", {self.threads} thread{'s' if self.threads > 1 else ''}"
        if self.compute_dtype != self.weight_dtype:
            text += f" ({self.path.reason})"
        return text
