"""ONNX in: ``fxforge.from_onnx`` and ``python -m fxforge compile model.onnx -o DIR``.

The model becomes an :class:`~fxforge.irgraph.onnx_import.OnnxModule` (ATen ops, initializers as
buffers named like the ONNX initializers), which the usual ways in compile: ``fxforge.compile``
(dynamo; the ONNX model's named dynamic dims are marked dynamic before the first call, so one
graph serves every size) or ``aot_compile`` (torch.export, one ``Dim`` per name).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from fxforge.irgraph.onnx_import import OnnxImportError, OnnxModule, coverage, import_model
from fxforge.irgraph.onnx_import.model import MIN_OPSET, Source, newest_opset

log = logging.getLogger("fxforge")

__all__ = ["OnnxImportError", "OnnxModule", "coverage_table", "from_onnx", "onnx_input_specs"]


class CompiledOnnx(torch.nn.Module):
    """An imported ONNX model compiled by fxforge; ``eager`` is the uncompiled module (the
    reference: an ONNX interpreter on ATen ops)."""

    def __init__(self, eager: OnnxModule, compiled: Any):
        super().__init__()
        self.eager = eager
        self.__dict__["compiled"] = compiled   # wraps ``eager``: not a second submodule
        self._dynamic = eager.dynamic_dims()

    def forward(self, *args: torch.Tensor) -> Any:
        self.eager.check_inputs(args)
        for arg, dims in zip(args, self._dynamic):
            for axis in dims:
                torch._dynamo.maybe_mark_dynamic(arg, axis)
        return self.compiled(*args)


def from_onnx(source: Source, *, compile: bool = True, example_inputs: Sequence[Any] = (),
              quantized_weights: str = "exact", **options: Any) -> torch.nn.Module:
    """An ONNX model (a path, serialized bytes or an ``onnx.ModelProto``) as a callable module.

    ``compile=True`` (default) compiles it with fxforge (``options`` as for ``fxforge.compile``;
    given ``example_inputs`` it compiles now, else on the first call); ``compile=False`` returns
    the eager :class:`OnnxModule`. Quantized weights (``DequantizeLinear`` into ``MatMul``,
    ``com.microsoft::MatMulNBits``) become fxforge weight formats where a format holds their
    values exactly; ``quantized_weights="nearest"`` also maps asymmetric 4-bit weights whose
    offsets fp16 rounds. Raises :class:`OnnxImportError` for a malformed model or ops fxforge
    does not import (all of them listed at once).
    """
    module = import_model(source, quantized_weights)
    log.info("fxforge: imported ONNX model %r: %d steps, %d nodes folded, %d If/Loop inlined",
             module.model_name, len(module.program.steps), module.program.folded,
             module.program.inlined)
    if not compile:
        if options:
            raise TypeError("from_onnx(compile=False) takes no compile options")
        return module
    import fxforge
    compiled = CompiledOnnx(module, fxforge.compile(module, **options))
    if example_inputs:
        compiled(*example_inputs)
    return compiled


def onnx_input_specs(module: OnnxModule, sizes: Optional[dict[str, int]] = None) -> list:
    """The model's inputs as CLI input specs (``fxforge.specs.InputSpec``): named dynamic dims
    with their example size (``sizes``, default 8), integer inputs valued 0..1 (a mask: 1)."""
    from fxforge.specs import DimSpec, InputSpec
    sizes = sizes or {}
    specs = []
    for spec in module.input_specs:
        dims = tuple(DimSpec(d) if isinstance(d, int) else
                     DimSpec(sizes.get(d, 8), d, 1, None) for d in spec.dims)
        integer = not (spec.dtype.is_floating_point or spec.dtype == torch.bool)
        low = (1 if "mask" in spec.name.lower() else 0) if integer else None
        specs.append(InputSpec(spec.dtype, dims, low, (low + 1) if integer else None))
    return specs


def coverage_table(opset: Optional[int] = None) -> str:
    """The ops fxforge imports at ``opset`` (default: the newest), as a text table."""
    opset = newest_opset() if opset is None else opset
    rows = coverage(opset)
    width = max([len(op) for _, op, _, _ in rows] + [26]) + 2   # op names run to 32 characters
    lines = [f"ONNX ops fxforge imports at opset {opset} (opsets {MIN_OPSET}..{newest_opset()}): "
             f"{len(rows)}", f"{'domain':<16}{'op':<{width}}opsets"]
    for domain, op, since, until in rows:
        span = f"{max(since, MIN_OPSET)}..{until if until is not None else newest_opset()}"
        if domain:   # another domain's own opset versions (com.microsoft: 1), not ai.onnx's
            span = f"{since}..{until if until is not None else ''} (domain opset)"
        lines.append(f"{domain or 'ai.onnx':<16}{op:<{width}}{span}")
    return "\n".join(lines)
