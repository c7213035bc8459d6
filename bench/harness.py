"""Benchmark harness: time models under eager, inductor and fxforge.

A *case* is one (model, workload) pair: a module plus positional example inputs.
Each case is compiled under each compiler with its own ``torch.compile`` (dynamo is
reset before and after each case, so every compiled graph sees a single static input
shape; dynamo keeps one cache entry per backend, guarded by that backend). The first
call (compilation) is timed separately and excluded from the statistics. Then the
compilers are timed *interleaved*: each round gives every compiler a short block of
back-to-back calls, so a noisy moment of this shared machine slows all of them alike
instead of one compiler's whole series (``time_interleaved``).

Workloads:
  * ``prefill``: batch 1, ``seq`` tokens (128 by default) through the whole model.
  * ``decode1``: one new token. Hugging Face models run a real KV-cached step
    (``hf_models.DecodeStep`` over a ``seq``-token cache); models without a cache
    (small GPT, MLP block) run a single-token forward.

A failure (build, compile, run or mismatch) is recorded in the result and the
run goes on.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from typing import Callable

import torch

COMPILERS = ("eager", "inductor", "fxforge", "fxforge_tuned", "fxforge_bf16")
# fxforge variants: the options each runs with (fxforge_bf16: matmuls/attention in bf16 where the
# hardware has a bf16 path; on a CPU without one fxforge keeps fp32 and says so; fxforge_tuned:
# autotuned configs from the tuning cache, tuning what is missing during its compile).
FXFORGE_OPTIONS = {"fxforge": {}, "fxforge_tuned": {"autotune": True},
                   "fxforge_bf16": {"precision": "bf16"}}
WORKLOADS = ("prefill", "decode1")


@dataclasses.dataclass
class Case:
    model: str
    workload: str
    module: torch.nn.Module
    inputs: tuple
    note: str = ""


@dataclasses.dataclass
class Result:
    model: str
    workload: str
    compiler: str
    status: str = "ok"  # ok | error | skipped
    error: str = ""
    compile_s: float | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    repeats: int = 0
    max_abs_diff: float | None = None
    matches: bool | None = None  # max_abs_diff within RTOL of the largest eager output
    kernels: int | None = None  # kernels launched per forward (eager: ATen ops; fxforge: lowered)
    note: str = ""


BLOCK = 4  # timed calls per runner per interleaved round (time_interleaved)
RTOL = 1e-3  # tolerated max |compiled - eager|, relative to max |eager| (at least 1)
LOW_PRECISION_RTOL = 2e-2  # the same for precision="bf16" (a lossy option)


# --------------------------------------------------------------------------- models


def _mlp_cases(seq: int) -> list[Case]:
    from fxforge.examples.small_gpt import make_mlp_block, mlp_example_inputs

    block = make_mlp_block()
    return [
        Case("mlp", "prefill", block, mlp_example_inputs(batch=1, seq=seq)),
        Case("mlp", "decode1", block, mlp_example_inputs(batch=1, seq=1), "single-token forward"),
    ]


def _small_gpt_cases(seq: int) -> list[Case]:
    from fxforge.examples.small_gpt import example_inputs, make_model

    model = make_model()
    return [
        Case("small_gpt", "prefill", model, example_inputs(batch=1, seq=seq)),
        Case("small_gpt", "decode1", model, example_inputs(batch=1, seq=1), "no KV cache: single-token forward"),
    ]


def _hf_cases(name: str, model: torch.nn.Module, seq: int) -> list[Case]:
    """Prefill through ``LogitsOnly`` and a cached decode step through ``DecodeStep``."""
    from fxforge.examples.hf_models import DecodeStep, LogitsOnly, decode_inputs

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, seq), generator=gen)
    with torch.inference_mode():
        step_inputs = decode_inputs(model, past_len=seq)
    return [
        Case(name, "prefill", LogitsOnly(model), (ids,)),
        Case(name, "decode1", DecodeStep(model), step_inputs, f"KV-cached step, past={seq}"),
    ]


def _hf_bench_cases(arch: str, seq: int) -> list[Case]:
    from fxforge.examples.hf_models import build_bench

    return _hf_cases(arch, build_bench(arch, "small"), seq)


def _smollm2_cases(seq: int) -> list[Case]:
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status

    ok, reason = smollm2_status()
    if not ok:
        raise RuntimeError(f"SmolLM2 unavailable: {reason}")
    model, _ = load_smollm2(progress=False)
    return _hf_cases("smollm2", model, seq)


MODELS: dict[str, Callable[[int], list[Case]]] = {
    "mlp": _mlp_cases,
    "small_gpt": _small_gpt_cases,
    "gpt2": lambda seq: _hf_bench_cases("gpt2", seq),
    "llama": lambda seq: _hf_bench_cases("llama", seq),
    "smollm2": _smollm2_cases,
}


# --------------------------------------------------------------------------- compilers


def make_runner(compiler: str, module: torch.nn.Module):
    """``module`` itself for eager, else a fresh ``torch.compile`` of it.

    ``fxforge`` resolves through its ``torch_dynamo_backends`` entry point, or
    by importing its backend function when fxforge is not pip-installed.
    """
    if compiler == "eager":
        return module
    if compiler in FXFORGE_OPTIONS:
        return torch.compile(module, backend="fxforge", options=FXFORGE_OPTIONS[compiler])
    from fxforge.examples.chat_demo import resolve_backend

    return torch.compile(module, backend=resolve_backend(compiler))


def count_kernels(compiler: str, case_inputs: tuple, module, graphs: list) -> int | None:
    """Kernels one forward launches: eager's ATen ops, or the kernels of fxforge's graphs."""
    if compiler == "eager":
        from fxforge.explain import count_eager_kernels
        return sum(count_eager_kernels(module, *case_inputs).values())
    if compiler in FXFORGE_OPTIONS and graphs and all(g.lowered.kernels is not None for g in graphs):
        return sum(g.lowered.kernels for g in graphs)
    return None


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in [0, 1])."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


# Pause before each runner of a round-robin: ONNX Runtime's thread pool and OpenMP's workers
# spin-wait after a call, and a runner started within that window shares the cores with them.
# Without the pause a single 128x576x960 MatMul measured 1252 us in ONNX Runtime right after
# fxforge, 769 us with it (Zen 4, 2 threads): each runner's time depended on the one before it.
SETTLE_S = 0.05


def round_robin(runs: dict, inputs: tuple, rounds: int, settle_s: float = SETTLE_S) -> dict:
    """label -> its ms in each of ``rounds`` rounds; each round times every runner once, the
    order rotated by one each round (no runner always follows the same one), a pause of
    ``settle_s`` before each."""
    times: dict = {label: [] for label in runs}
    labels = list(runs)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            time.sleep(settle_s)
            start = time.perf_counter()
            runs[label](*inputs)
            times[label].append(1e3 * (time.perf_counter() - start))
    return times


def paired(times: dict, label: str, base: str) -> str:
    """``base``'s time over ``label``'s, round by round (the host's speed drifts between rounds,
    not within one): the median ratio and its range."""
    ratios = sorted(b / t for b, t in zip(times[base], times[label]))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def time_interleaved(runners: list, inputs: tuple, device: torch.device, warmup: int,
                     repeats: int, budget_s: float, block: int = BLOCK) -> list[list[float]]:
    """Per-call wall times in ms for each runner: ``warmup`` untimed calls each, then rounds in
    which each runner makes one untimed call and ``block`` timed ones, until ``repeats`` timed
    calls each, stopping early (after at least 3 rounds) once ``budget_s`` per runner is spent.

    A round is a block per runner, not a single call: a model in deployment runs back to back,
    with its weights and code warm in the caches, and one call squeezed between other models'
    calls would measure a cold start instead (it slowed fxforge's small-GPT prefill by 4-10% and
    Inductor's by 2-4% here). The rounds still interleave, so host noise hits every runner."""
    for fn in runners:
        for _ in range(warmup):
            fn(*inputs)
    _sync(device)
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    rounds = 0
    while len(times[0]) < repeats:
        for fn, samples in zip(runners, times):
            fn(*inputs)
            _sync(device)
            for _ in range(min(block, repeats - len(samples))):
                t0 = time.perf_counter()
                fn(*inputs)
                _sync(device)
                samples.append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 3 and time.perf_counter() - start > budget_s * len(runners):
            break
    return times


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot compare output of type {type(out).__name__}")


def prepare_case(case: Case, compiler: str, reference: torch.Tensor | None,
                 device: torch.device) -> tuple[Result, Callable | None, torch.Tensor | None]:
    """Compile (unless eager) and check against ``reference``. Never raises: a failure is
    recorded in the result and the runner is None."""
    res = Result(case.model, case.workload, compiler, note=case.note)
    try:
        from fxforge.compiler import recording

        runner = make_runner(compiler, case.module)
        t0 = time.perf_counter()
        with recording() as graphs:
            out = _first_tensor(runner(*case.inputs))
        _sync(device)
        res.compile_s = time.perf_counter() - t0
        res.kernels = count_kernels(compiler, case.inputs, case.module, graphs)
        if reference is not None:
            res.max_abs_diff = (out.float() - reference.float()).abs().max().item()
            rtol = LOW_PRECISION_RTOL if compiler == "fxforge_bf16" else RTOL
            res.matches = res.max_abs_diff <= rtol * max(1.0, reference.float().abs().max().item())
        return res, runner, out
    except Exception as exc:  # a broken compiler must not end the whole run
        _record_error(res, exc)
        return res, None, None


def _record_error(res: Result, exc: Exception) -> None:
    res.status = "error"
    res.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
    res.note = (res.note + " | " if res.note else "") + traceback.format_exc(limit=3)[-1500:]


def time_case(prepared: list[tuple[Result, Callable]], inputs: tuple, device: torch.device,
              warmup: int, repeats: int, budget_s: float) -> None:
    """Time the prepared runners interleaved and fill in their results' statistics."""
    try:
        all_times = time_interleaved([runner for _, runner in prepared], inputs, device, warmup,
                                     repeats, budget_s)
    except Exception as exc:  # which runner failed is not known: all of this case's fail
        for res, _ in prepared:
            _record_error(res, exc)
        return
    for (res, _), times in zip(prepared, all_times):
        times.sort()
        res.repeats = len(times)
        res.median_ms = statistics.median(times)
        res.p20_ms = _percentile(times, 0.2)
        res.p80_ms = _percentile(times, 0.8)


def _move(case: Case, device: torch.device) -> Case:
    module = case.module.to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in case.inputs)
    return dataclasses.replace(case, module=module, inputs=inputs)


def run_all(models: list[str], compilers: list[str], device: str = "cpu", seq: int = 128,
            warmup: int = 3, repeats: int = 20, budget_s: float = 5.0,
            log: Callable[[str], None] = print) -> list[Result]:
    """Run every (model, workload, compiler); eager always runs first as the reference."""
    dev = torch.device(device)
    order = ["eager"] + [c for c in compilers if c != "eager"]
    results: list[Result] = []
    for name in models:
        try:
            cases = MODELS[name](seq)
        except Exception as exc:
            log(f"[{name}] skipped: {type(exc).__name__}: {exc}")
            for wl in WORKLOADS:
                for comp in compilers:
                    results.append(Result(name, wl, comp, status="skipped", error=f"{type(exc).__name__}: {exc}"))
            continue
        for case in cases:
            results.extend(_run_case(_move(case, dev), order, compilers, dev, warmup, repeats,
                                     budget_s, log))
        del cases
    return results


def _run_case(case: Case, order: list[str], compilers: list[str], device: torch.device,
              warmup: int, repeats: int, budget_s: float, log: Callable[[str], None]) -> list[Result]:
    """Every compiler of ``order`` on one case: compiled one after another (eager first, the
    reference), then timed together, interleaved."""
    import torch._dynamo

    torch._dynamo.reset()
    prepared: list[tuple[Result, Callable]] = []
    results: list[Result] = []
    reference = None
    try:
        with torch.inference_mode():
            for comp in order:
                res, runner, out = prepare_case(case, comp, reference, device)
                if comp == "eager":
                    reference = out
                if comp in compilers:
                    results.append(res)
                    if runner is not None:
                        prepared.append((res, runner))
            time_case(prepared, case.inputs, device, warmup, repeats, budget_s)
    finally:
        torch._dynamo.reset()
    for res in results:
        log(_log_line(res))
    return results


def _log_line(r: Result) -> str:
    head = f"[{r.model}/{r.workload}/{r.compiler}]"
    if r.status != "ok":
        return f"{head} {r.status.upper()}: {r.error.splitlines()[0][:200] if r.error else ''}"
    diff = "" if r.max_abs_diff is None else f" maxdiff={r.max_abs_diff:.2e}" + ("" if r.matches else " MISMATCH")
    return f"{head} median {r.median_ms:.3f} ms (p20 {r.p20_ms:.3f}, p80 {r.p80_ms:.3f}, n={r.repeats}) compile {r.compile_s:.1f}s{diff}"


def environment(device: str) -> dict:
    import platform

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
