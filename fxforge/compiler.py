"""IR -> runnable: freeze weights, run the pass pipeline, lower through a backend.

Weights arrive from dynamo as graph inputs. Freezing turns them into constants so passes can
fold and prepack them. The runtime guards that assumption: if a frozen weight is replaced or
modified in place (its version counter moves), the graph is rebuilt from the new values before
the call, so a changed weight can never give a stale answer.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from fxforge.autotune import session as tuning
from fxforge.backends import Backend, LoweredGraph, lower, resolve_backend
from fxforge.errors import VerificationError
from fxforge.irgraph import IRGraph, build_ir
from fxforge.options import CompileOptions
from fxforge.passes import PassManager, default_pipeline

log = logging.getLogger("fxforge")

# Compiled graphs made while a ``recording()`` block is open (fxforge.explain reads them).
_RECORDERS: list[list] = []


@contextlib.contextmanager
def recording():
    """Collect every :class:`CompiledGraph` built inside the block (innermost block only)."""
    graphs: list = []
    _RECORDERS.append(graphs)
    try:
        yield graphs
    finally:
        _RECORDERS.remove(graphs)

# Tolerances for comparing against eager, by dtype (verify=True and the tests use these).
# fp32 allows for reassociation (a different reduction order), nothing more.
TOLERANCES = {torch.float32: (1.3e-5, 1e-5), torch.float64: (1e-7, 1e-7),
              torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (1e-3, 1e-4),
              torch.complex64: (1.3e-5, 1e-5), torch.complex128: (1e-7, 1e-7)}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a compiled result of ``dtype`` with eager."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


def effective_options(options: CompileOptions, backend: Backend) -> CompileOptions:
    """The options the pipeline runs with on ``backend``: a low precision the hardware has no
    fast math path for (bf16 on a CPU without AMX or AVX512-BF16) runs as the backend's
    weight-only variant where it has one (``bf16_weights``: low-precision weight storage, fp32
    math), and otherwise stays fp32, which would only lose accuracy and time; the log says which
    and why."""
    if options.precision == "fp32":
        return options
    reason = backend.precision_unsupported(options.precision)
    if reason is None:
        return options
    weight_only = backend.weight_only_precision(options.precision)
    if weight_only is not None:
        log.warning("fxforge: precision=%r on the %s backend: %s; weights are rounded to %s and "
                    "stored so where a kernel reads them (C++ GEMM/GEMV: half the bytes), math stays "
                    "fp32 (precision %r)", options.precision, backend.name, reason,
                    options.precision, weight_only)
        return dataclasses.replace(options, precision=weight_only)
    log.warning("fxforge: precision=%r runs in fp32 on the %s backend: %s", options.precision,
                backend.name, reason)
    return dataclasses.replace(options, precision="fp32")


def optimize(ir: IRGraph, options: CompileOptions, backend: Optional[Backend] = None) -> IRGraph:
    """Run the pipeline for ``options`` (adjusted to ``backend``'s hardware when given)."""
    if backend is not None:
        options = effective_options(options, backend)
    out = PassManager(default_pipeline(options.to_dict())).run(ir)
    out.info["precision"] = options.precision
    return out


@contextlib.contextmanager
def tuning_session(mode: str, overlay=None):
    """The autotuning session lowering runs in: an enclosing one (a ``fxforge tune`` run, an
    artifact's shipped results) wins; else one for the ``autotune`` option; else none."""
    outer = tuning.current()
    if outer is not None:
        yield outer
    elif mode != "off" or overlay is not None:
        with tuning.session(mode if mode != "off" else "cache", overlay=overlay) as active:
            yield active
    else:
        yield None


def freeze(ir: IRGraph, positions: Sequence[int], values: Sequence[torch.Tensor]) -> IRGraph:
    """Placeholders at ``positions`` become constants holding ``values``."""
    placeholders = ir.placeholders()
    constants = {placeholders[p].name: v for p, v in zip(positions, values)}
    # build_ir makes the GraphModule: the copy needs no code of its own.
    frozen = build_ir(ir.copy(recompile=False).gm, ir.fake_mode, constants, ir.info)
    frozen.info["frozen_weights"] = len(constants)
    return frozen


class CompiledGraph:
    """The callable handed back to dynamo/aot_autograd for one captured graph."""

    def __init__(self, captured: IRGraph, options: CompileOptions, weight_positions: Sequence[int],
                 weights: Sequence[torch.Tensor]):
        self.captured = captured  # before freezing and passes: the eager oracle for verify
        self.options = options
        self.weight_positions = list(weight_positions) if options.freeze_weights else []
        skip = set(self.weight_positions)
        self.runtime_positions = [i for i in range(len(captured.placeholders())) if i not in skip]
        self._build([weights[i] for i in self.weight_positions] if self.weight_positions else [])
        if _RECORDERS:
            _RECORDERS[-1].append(self)

    def _build(self, weights: list[torch.Tensor]) -> None:
        start = time.perf_counter()
        self.weights = weights
        self.versions = [_version(w) for w in weights]
        if any(v is None for v in self.versions):
            log.info("fxforge: some weights are inference-mode tensors, which keep no version "
                     "counter: replacing them is detected, changing them in place is not")
        # The pass manager never modifies its input, so the captured graph needs no copy here.
        ir = freeze(self.captured, self.weight_positions, weights) if weights else self.captured
        backend = resolve_backend(self.options.backend, ir)
        self.ir = optimize(ir, self.options, backend)
        with tuning_session(self.options.autotune) as active:
            first = len(active.picks) if active else 0
            self.lowered: LoweredGraph = lower(self.ir, backend)
            self.kv = self._kv_cache(backend) if self.options.kv_cache else None
            self.tuning = list(dict.fromkeys(active.picks[first:])) if active else []
        release_lowered_irs([(self.ir, self.lowered)]
                            + ([(self.kv.plan.ir, self.kv.step)] if self.kv is not None else []))
        self.compile_seconds = time.perf_counter() - start   # passes + lowering (+ tuning)
        log.info("fxforge: compiled a graph of %d nodes into %d (%d frozen weights, %d eager "
                 "fallbacks) in %.1f ms", len(self.captured.gm.graph.nodes), len(self.ir.gm.graph.nodes),
                 len(weights), len(self.lowered.fallbacks), self.compile_seconds * 1e3)

    def _kv_cache(self, backend: Backend):
        """The incremental decoder over the KV-cache pass's step graph, or None (logged)."""
        from fxforge.kv_runtime import IncrementalDecoder, describe
        from fxforge.passes.kv_cache import insert_kv_cache
        plan = insert_kv_cache(self.ir)
        if isinstance(plan, str):
            log.info("fxforge: kv_cache: not applied (%s); the graph runs uncached", plan)
            return None
        log.info("fxforge: %s", describe(plan))
        return IncrementalDecoder(plan, lower(plan.ir, backend), self.lowered,
                                  self.options.max_seq_len, self.options.decode_replay)

    def _weights_changed(self, args: Sequence[Any]) -> bool:
        for pos, weight, version in zip(self.weight_positions, self.weights, self.versions):
            arg = args[pos]
            if arg is not weight or (version is not None and arg._version != version):
                return True
        return False

    def __call__(self, *args):
        if self.weight_positions and self._weights_changed(args):
            log.warning("fxforge: model weights changed since compilation; re-freezing them")
            self._build([args[p] for p in self.weight_positions])
        runtime_args = [args[i] for i in self.runtime_positions]
        outputs = self.kv(runtime_args) if self.kv is not None else self.lowered(*runtime_args)
        if self.options.verify:
            check_against_eager(outputs, self.captured.gm(*args), self.ir.info.get("precision", "fp32"))
        return outputs


def release_lowered_irs(pairs: Sequence[tuple[IRGraph, Any]]) -> None:
    """After lowering: each (IR, lowered callable) pair's IR stays for reports (``explain``),
    but its constants (folded weights such as the concatenated q/k/v projections; an
    artifact's whole weights) would be a second copy beside the kernels' packed ones: they are
    released where the lowered module is not the IR's own (the reference backend and an eager
    fallback run the IR's module itself). Then the freed heap goes back to the OS."""
    released = sum(ir.release_constants() for ir, lowered in pairs
                   if getattr(lowered, "gm", None) is not ir.gm)
    return_freed_memory()
    log.debug("fxforge: released %.1f MB of constants held by lowered IRs", released / 2**20)


@functools.lru_cache(maxsize=1)
def _libc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):   # not glibc: nothing to call
        return None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS after a compile. Packing reads transposed
    copies of every weight; glibc keeps such freed blocks (its mmap threshold rises after the
    first large free, so later ones come from the heap), and SmolLM2's process stayed ~535 MB
    larger than it needed (2369 -> 1833 MB RSS after ``malloc_trim``). A no-op without glibc."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _version(tensor: torch.Tensor):
    """The in-place version counter, or None for inference tensors (they keep none)."""
    return None if tensor.is_inference() else tensor._version


_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16_weights": torch.bfloat16}


def check_against_eager(outputs: Any, expected: Any, precision: str = "fp32") -> None:
    """Compare with eager at the output dtype's tolerance, or at the compute precision's when
    matmuls ran in bf16/fp16 (a lossy option the user asked for)."""
    flat_out, _ = torch.utils._pytree.tree_flatten(outputs)
    flat_exp, _ = torch.utils._pytree.tree_flatten(expected)
    if len(flat_out) != len(flat_exp):
        raise VerificationError(f"compiled graph returned {len(flat_out)} values, eager {len(flat_exp)}")
    for i, (got, want) in enumerate(zip(flat_out, flat_exp)):
        if not isinstance(want, torch.Tensor):
            if got != want:
                raise VerificationError(f"output {i}: compiled {got!r} != eager {want!r}")
            continue
        if got.shape != want.shape or got.dtype != want.dtype:
            raise VerificationError(f"output {i}: compiled {got.dtype}{list(got.shape)} vs eager "
                                    f"{want.dtype}{list(want.shape)}")
        rtol, atol = tolerance(want.dtype)
        if precision in _LOW and want.is_floating_point():
            rtol, atol = (max(a, b) for a, b in zip((rtol, atol), _low_tolerance(want, precision)))
        if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            diff = (got.double() - want.double()).abs().nan_to_num(0).max().item()
            raise VerificationError(f"output {i} ({want.dtype}{list(want.shape)}) differs from eager: "
                                    f"max abs diff {diff:.3g} over rtol={rtol}, atol={atol}")


def _low_tolerance(want: torch.Tensor, precision: str) -> tuple[float, float]:
    """Errors of a low-precision forward scale with the output's magnitude, not per element:
    allow the dtype's relative tolerance (x4 for accumulation through layers) of max |eager|."""
    rtol, _ = tolerance(_LOW[precision])
    scale = want.detach().abs().max().item() if want.numel() else 1.0
    return rtol, 4 * rtol * max(scale, 1.0)


def compile_captured(ir: IRGraph, options: CompileOptions, weight_positions: Sequence[int],
                     example_inputs: Sequence[Any]) -> Callable:
    return CompiledGraph(ir, options, weight_positions, list(example_inputs))
