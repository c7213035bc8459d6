"""Peers for the side-by-side benches (the optional ``peers`` extra): torchao's weight-only and
W8A8 configs applied to a copy of a model, and a model exported to ONNX and run by ONNX Runtime.

Each builder returns ``(runner, None)`` or ``(None, reason)``: a config that does not run on
this CPU is reported by the bench with its error, never a crash.

torchao 0.18 on a CPU (checked on an AMD EPYC Zen 4 with torch 2.13 CPU): ``Int8WeightOnlyConfig``
and ``Int8DynamicActivationInt8WeightConfig`` run on fp32 models; ``Int4WeightOnlyConfig`` does
not (its ``plain`` packing needs the ``mslk`` CUDA kernels, ``tile_packed_to_4d`` bf16 weights,
``plain_int32`` has no CPU kernel): the CPU int4 weight-only path is the prototype
``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``: ATen's ``_weight_int4pack_mm_for_cpu``,
asymmetric, tinygemm qparams). torchao's documented use is ``torch.compile`` of the quantized
model, which is how the runners here call it.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

# name -> (description, config factory name): the torchao runs of the benches
TORCHAO_SCHEMES = {
    "int8wo": "Int8WeightOnlyConfig() (per-channel int8)",
    "int4wo:g64": "PrototypeInt4WeightOnlyConfig(group_size=64) (CPU int4, tinygemm)",
    "int4wo:g32": "PrototypeInt4WeightOnlyConfig(group_size=32) (CPU int4, tinygemm)",
    "w8a8": "Int8DynamicActivationInt8WeightConfig() (dynamic per-token int8 activations)",
}


def torchao_config(scheme: str):
    """The torchao config object of ``scheme`` (a key of :data:`TORCHAO_SCHEMES`)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)   # its missing-CUDA-library notices
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    # torchao's inductor settings are applied around its own calls only (torchao_inductor)
    if scheme == "int8wo":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "w8a8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme.startswith("int4wo:g"):
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        return PrototypeInt4WeightOnlyConfig(group_size=int(scheme.split(":g")[1]),
                                             set_inductor_config=False)
    raise ValueError(f"unknown torchao scheme {scheme!r}; one of {list(TORCHAO_SCHEMES)}")


def torchao_inductor() -> Callable:
    """Wrap a callable so that it runs (and compiles) under the inductor settings torchao's
    ``set_inductor_config`` would set process-wide (``recommended_inductor_config_setter``),
    which would also change the plain ``torch.compile`` runners of the same run."""
    settings = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                "force_fuse_int_mm_with_mul": True}

    def wrap(fn: Callable) -> Callable:
        def run(*args):
            with torch._inductor.config.patch(settings):
                return fn(*args)
        return run
    return wrap


def torchao_model(model: torch.nn.Module, scheme: str, compile: bool = True
                  ) -> tuple[Optional[Callable], Optional[str]]:
    """(a quantized copy of ``model``, compiled by ``torch.compile`` under torchao's inductor
    settings when ``compile``: its first call compiles) or (None, why it cannot run here)."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError as exc:
        return None, f"torchao not installed ({exc}); pip install 'fxforge[peers]'"
    try:
        quantized = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(quantized, torchao_config(scheme))
    except Exception as exc:   # a config this CPU/build cannot run: reported, the bench goes on
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    plain = sum(type(m.weight.data) is torch.Tensor for m in linears)   # left as they were
    if plain == len(linears):
        return None, f"torchao {scheme} quantized none of the {len(linears)} linears"
    if plain:   # torchao skips a linear whose K its group does not divide, silently
        print(f"  torchao {scheme}: {plain} of {len(linears)} linears left unquantized", flush=True)
    return (torchao_inductor()(torch.compile(quantized)) if compile else quantized), None


def torchao_check(module: Callable, example: tuple) -> Optional[str]:
    """Run ``module`` once on ``example`` (compiling it); the error text if that fails."""
    try:
        with torch.no_grad():
            module(*example)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def onnx_runner(module: torch.nn.Module, example: torch.Tensor, threads: int,
                folder: Optional[Path] = None) -> tuple[Optional[Callable], Optional[str], str]:
    """(fn(ids) -> logits of every position, None, how it was exported) running ``module``
    (``forward(input_ids) -> logits``, no KV cache outputs) in ONNX Runtime's CPU provider with
    ``threads`` intra-op threads, or (None, why not, ""). Exported with
    ``torch.onnx.export(dynamo=True)`` and the sequence length dynamic; when that fails, the
    legacy TorchScript exporter."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return None, f"onnxruntime not installed ({exc}); pip install 'fxforge[peers]'", ""
    folder = Path(folder or tempfile.mkdtemp(prefix="fxforge-onnx-"))
    folder.mkdir(parents=True, exist_ok=True)
    path, errors, how = folder / "model.onnx", [], ""
    for dynamo in (True, False):
        try:
            _export(module, example, path, dynamo)
            how = "torch.onnx.export(dynamo=True)" if dynamo else "torch.onnx.export (legacy)"
            break
        except Exception as exc:
            errors.append(f"{'dynamo' if dynamo else 'legacy'}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}")
    if not how:
        return None, "ONNX export failed: " + "; ".join(errors), ""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: ids.numpy()})[0])
    return run, None, how + f", onnxruntime {ort.__version__}, {threads} threads"


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    export_model(module, (example,), path, {"input_ids": {1: "seq"}}, dynamo)


def export_model(module: torch.nn.Module, examples: tuple, path: Path,
                 inputs: dict[str, dict[int, str]], dynamo: bool) -> None:
    """``module`` to an ONNX file: ``inputs`` names each positional input and its dynamic axes
    (axis -> dim name; inputs sharing a name share the size); outputs named ``output_<i>``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        names = list(inputs)
        if dynamo:
            dims: dict[str, torch.export.Dim] = {}
            shapes = tuple({axis: dims.setdefault(dim, torch.export.Dim(dim, min=2, max=4096))
                            for axis, dim in inputs[name].items()} for name in names)
            program = torch.onnx.export(module, examples, dynamo=True, optimize=True,
                                        dynamic_shapes=shapes, input_names=names, verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(module, examples, str(path), dynamo=False, input_names=names,
                              dynamic_axes=inputs)


def torchao_decode_runners(model: torch.nn.Module, prompt: torch.Tensor, schemes: list[str],
                           hf_runners: Callable) -> dict:
    """``torchao <scheme>``: a quantized copy of the Hugging Face ``model`` decoding with
    ``generate(cache_implementation="static")`` and its forward compiled by ``torch.compile``
    (torchao's documented recipe; ``hf_runners`` is bench/generate.py's): name -> fn(new_tokens)
    -> ids. A scheme that cannot run here is printed with its error and left out."""
    runners = {}
    for scheme in schemes:
        quantized, why = torchao_model(model, scheme, compile=False)
        if quantized is not None:
            run = torchao_inductor()(hf_runners(quantized, prompt)["hf + inductor static"])
            why = torchao_check(run, (2,))   # compiles (the warm-up the bench does anyway)
        if why:
            print(f"  torchao {scheme}: cannot run here: {why}", flush=True)
            continue
        runners[f"torchao {scheme}"] = run
    return runners
