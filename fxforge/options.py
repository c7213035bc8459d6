"""Compile options: one dataclass, validated once, shared by every way in."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

from fxforge.errors import OptionsError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"       # matmul/attention precision; norms and accumulations stay fp32
    kv_cache: bool = False        # KV-cache insertion for causal decoders (transparent mode)
    max_seq_len: int = 2048       # positions a KV cache holds; longer inputs run uncached
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "int8" (irgraph/kv_quant.py)
    decode_replay: bool = True    # CPU decode steps replayed from a validated recording
    max_sessions: int = 8         # KV-cache states kept per graph (sequences; LRU beyond)
    quantize: Optional[tuple] = None  # weight-only quantization rules (passes/quantize.py)
    accuracy_budget: Optional[tuple] = None  # quantize="auto"'s bound: ("kl", 0.01) (quantize_plan.py)
    requantize_on_change: bool = False  # a weight changed after a quantized compile: requantize
    prune: Optional[str] = None   # structured pruning: "mlp:0.25,layers:2" (passes/prune_spec.py)
    attention: Optional[str] = None  # attention rewrites: "sliding_window:W,sinks:S", "linear:elu" (attention_modes.py)
    autotune: str = "off"         # "off", "tune" (True: cached configs, tune what is missing), "cache"
    verify: bool = False          # run eager alongside and raise VerificationError on mismatch
    passes: Optional[tuple] = None  # explicit pass pipeline (names), replacing the default
    backend: str = "auto"         # "auto" (Triton on GPUs, cpu otherwise), "cpu", "triton", "reference"
    freeze_weights: bool = True   # weights become compile-time constants (re-frozen if they change)
    tensor_parallel: Any = False  # True or a world size: shard over the torch.distributed group (passes/tensor_parallel.py)

    @property
    def lossy(self) -> bool:
        """A pass that changes the model's meaning on purpose (quantization, sparse attention)
        runs: checks compare against the optimized graph's own meaning, not eager's."""
        return bool(self.quantize or self.attention or self.prune or self.int8_kv_cache)

    @property
    def int8_kv_cache(self) -> bool:
        return self.kv_cache and self.kv_cache_dtype == "int8"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passes"] = list(self.passes) if self.passes is not None else None
        return out


AUTOTUNE_MODES = {False: "off", True: "tune", "off": "off", "tune": "tune", "cache": "cache"}


def parse_options(options: Optional[Mapping[str, Any]] = None, **more: Any) -> CompileOptions:
    merged = dict(options or {})
    merged.update(more)
    known = {f.name for f in fields(CompileOptions)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise OptionsError(f"unknown fxforge option(s) {', '.join(map(repr, unknown))}; "
                           f"known options: {', '.join(sorted(known))}")
    if merged.get("precision", "fp32") not in PRECISIONS:
        raise OptionsError(f"precision must be one of {PRECISIONS}, got {merged['precision']!r}")
    _check_prune(merged)
    if merged.get("quantize") is not None:
        from fxforge.passes.quantize import QuantizeSpecError, parse_quantize
        try:
            merged["quantize"] = parse_quantize(merged["quantize"])
        except QuantizeSpecError as exc:
            raise OptionsError(f"option quantize: {exc}") from None
    _check_budget(merged)
    if merged.get("attention") is not None:
        from fxforge.passes.attention_modes import AttentionSpecError, parse_attention
        try:
            merged["attention"] = str(parse_attention(merged["attention"]))
        except AttentionSpecError as exc:
            raise OptionsError(str(exc)) from None
    if "autotune" in merged:
        mode = merged["autotune"]
        if not isinstance(mode, (bool, str)) or mode not in AUTOTUNE_MODES:
            raise OptionsError(f"option autotune must be True, False, 'tune', 'cache' or 'off', "
                               f"got {mode!r}")
        merged["autotune"] = AUTOTUNE_MODES[mode]
    if merged.get("passes") is not None:
        merged["passes"] = tuple(_check_passes(merged["passes"]))
    if "backend" in merged:
        from fxforge.backends import available_backends, backend_unavailable
        if merged["backend"] != "auto" and merged["backend"] not in available_backends():
            raise OptionsError(f"unknown backend {merged['backend']!r}; available: {available_backends()}")
        missing = backend_unavailable(merged["backend"]) if merged["backend"] != "auto" else None
        if missing is not None:
            raise OptionsError(f"backend={merged['backend']!r} {missing}")
    for key in ("max_seq_len", "max_sessions"):
        if key in merged and (type(merged[key]) is not int or merged[key] < 1):
            raise OptionsError(f"option {key} must be a positive integer, got {merged[key]!r}")
    for key in ("verify", "freeze_weights", "kv_cache", "decode_replay", "requantize_on_change"):
        if key in merged and not isinstance(merged[key], bool):
            raise OptionsError(f"option {key} must be True or False, got {merged[key]!r}")
    _check_kv_cache_dtype(merged)
    _check_tensor_parallel(merged)
    return CompileOptions(**merged)


def _check_prune(merged: dict) -> None:
    """``prune`` parsed to its canonical string. 2:4 semi-structured sparsity is refused where
    no kernel gains from it (every CPU backend: PyTorch's semi-structured kernels need CUDA), at
    once: a compile error later would only make the graph run eagerly, silently slower."""
    from fxforge.passes.prune_spec import PruneSpecError, parse_prune
    if merged.get("prune") is None:
        return
    try:
        spec = parse_prune(merged["prune"])
    except PruneSpecError as exc:
        raise OptionsError(str(exc)) from None
    merged["prune"] = str(spec)
    if spec.sparsity is None:
        return
    import torch
    backend = merged.get("backend", "auto")
    if backend in ("cpu", "reference") or not torch.cuda.is_available():
        raise OptionsError(f"option prune={merged['prune']!r}: 2:4 semi-structured sparsity is "
                           "GPU-only (PyTorch's semi-structured sparse kernels need CUDA) and no "
                           "CPU kernel gains from it; prune whole MLP channels or layers instead")
    raise OptionsError(f"option prune={merged['prune']!r}: 2:4 semi-structured sparsity is not "
                       "lowered by fxforge's Triton backend yet (the GPU kernels issue)")


# quantize roundings and schemes that run the graph on calibration inputs while compiling
_CALIBRATING = (":gptq", "auto", "w8a8")


def _check_tensor_parallel(merged: dict) -> None:
    """``tensor_parallel``: False, True (the process group's world size) or that size; checked
    against the process group now, so a script launched without torchrun fails here."""
    value = merged.get("tensor_parallel", False)
    if value is False:
        return
    if value is not True and (type(value) is not int or value < 1):
        raise OptionsError(f"option tensor_parallel must be True, False or a world size (a "
                           f"positive integer), got {value!r}")
    if merged.get("freeze_weights") is False:
        raise OptionsError("option tensor_parallel needs freeze_weights=True: the pass splits "
                           "the weights the compile froze into this rank's shards")
    for other in ("prune", "attention"):
        if merged.get(other):
            raise OptionsError(f"option tensor_parallel cannot be combined with {other}="
                               f"{merged[other]!r}: both choose which heads a graph holds")
    for _, scheme in merged.get("quantize") or ():
        if any(mark in scheme for mark in _CALIBRATING):
            raise OptionsError(f"option tensor_parallel with quantize scheme {scheme!r}: it "
                               "calibrates by running the graph while compiling, which would "
                               "run collectives then; use int8 or int4 (rtn or mse rounding)")
    from fxforge.passes.tensor_parallel import current_mesh
    mesh = current_mesh(value)
    merged["tensor_parallel"] = mesh.world if mesh.world > 1 else False


def _check_kv_cache_dtype(merged: dict) -> None:
    from fxforge.irgraph.kv_quant import parse_kv_cache_dtype
    if "kv_cache_dtype" not in merged:
        return
    try:
        merged["kv_cache_dtype"] = parse_kv_cache_dtype(merged["kv_cache_dtype"])
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    if merged["kv_cache_dtype"] != "auto" and not merged.get("kv_cache"):
        raise OptionsError(f"option kv_cache_dtype={merged['kv_cache_dtype']!r} needs "
                           "kv_cache=True (it sets how the KV cache is stored)")
    mode = str(merged.get("attention") or "").split(":")[0]
    if merged["kv_cache_dtype"] == "int8" and mode not in ("", "sliding_window"):
        raise OptionsError(f"option kv_cache_dtype='int8' is not available with attention "
                           f"mode {mode!r} (only dense and sliding_window caches hold int8)")


def _check_budget(merged: dict) -> None:
    """``accuracy_budget`` parsed, and present exactly when a quantize rule is "auto"."""
    from fxforge.passes.quantize import AUTO
    from fxforge.passes.quantize_plan import BudgetError, parse_budget
    try:
        budget = merged["accuracy_budget"] = parse_budget(merged.get("accuracy_budget"))
    except BudgetError as exc:
        raise OptionsError(f"option {exc}") from None
    auto = any(scheme == AUTO for _, scheme in merged.get("quantize") or ())
    if auto and budget is None:
        raise OptionsError("option quantize='auto' needs accuracy_budget, e.g. {'kl': 0.01} (mean "
                           "next-token KL vs fp32), {'ppl': 0.02} (+2% perplexity) or {'mse': 1e-3}")
    if budget is not None and not auto:
        raise OptionsError(f"option accuracy_budget={dict([budget])} applies to quantize='auto' "
                           f"only; quantize is {merged.get('quantize')!r}")


def _check_passes(names: Any) -> list[str]:
    from fxforge.passes import registered_passes
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise OptionsError(f"passes must be a list of pass names, got {names!r}")
    missing = [n for n in names if n not in registered_passes()]
    if missing:
        raise OptionsError(f"unknown pass(es) {missing}; registered: {sorted(registered_passes())}")
    return list(names)
