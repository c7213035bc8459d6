"""``OnnxModule``: an imported ONNX graph as a ``torch.nn.Module`` of ATen ops.

Its forward runs the program's converters in order. Eagerly it is an ONNX interpreter on torch;
traced (dynamo for ``fxforge.compile``, torch.export for AOT artifacts) it becomes the IR's ATen
graph, whose constants are the module's buffers, named as the ONNX initializers are
(``model.layers.0.mlp.up_proj.weight``), so per-weight options match them.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch

from fxforge.errors import InputSpecError
from fxforge.irgraph.onnx_import.program import InputSpec, Program
from fxforge.irgraph.onnx_import.table import as_tensor


class _Holder(torch.nn.Module):
    """A level of the initializers' dotted names."""


class OnnxModule(torch.nn.Module):
    # fixed once imported: fxforge.compile installs no dynamo guards under them
    static_attributes = ("program", "_const_paths", "input_specs")

    def __init__(self, program: Program, name: str = "onnx"):
        super().__init__()
        self.program = program
        self.model_name = name
        self.input_specs: list[InputSpec] = program.inputs
        self._const_paths: list[tuple[str, tuple[str, ...]]] = []
        paths = _Paths()
        for value_name, tensor in program.constants.items():
            path = paths.add(value_name)
            holder = self
            for part in path[:-1]:
                if not hasattr(holder, part):
                    holder.add_module(part, _Holder())
                holder = getattr(holder, part)
            holder.register_buffer(path[-1], tensor)
            self._const_paths.append((value_name, path))

    def forward(self, *args: torch.Tensor) -> Any:
        if not torch.compiler.is_compiling():
            self.check_inputs(args)
        env: dict[str, Any] = dict(zip((s.name for s in self.input_specs), args))
        for value_name, path in self._const_paths:
            holder = self
            for part in path:
                holder = getattr(holder, part)
            env[value_name] = holder
        for step in self.program.steps:
            values = [env[n] if n else None for n in step.inputs]
            if not step.dims:
                values = [as_tensor(v) for v in values]
            result = step.fn(step.node, *values)
            if len(step.outputs) == 1:
                env[step.outputs[0]] = result
            else:
                for name, value in zip(step.outputs, result):
                    if name:
                        env[name] = value
        outputs = tuple(as_tensor(env[name]) for name in self.program.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def check_inputs(self, args: tuple) -> None:
        specs = self.input_specs
        if len(args) != len(specs):
            raise InputSpecError(f"the ONNX model {self.model_name!r} takes {len(specs)} inputs "
                                 f"({', '.join(s.name for s in specs)}), got {len(args)}")
        for spec, arg in zip(specs, args):
            if not isinstance(arg, torch.Tensor):
                raise InputSpecError(f"input {spec.name!r} must be a tensor, got {type(arg).__name__}")
            if arg.dtype != spec.dtype:
                raise InputSpecError(f"input {spec.name!r} must be {spec.dtype}, got {arg.dtype}")
            if arg.dim() != len(spec.dims) or any(
                    isinstance(d, int) and d != s for d, s in zip(spec.dims, arg.shape)):
                raise InputSpecError(f"input {spec.name!r} must have shape {list(spec.dims)}, got "
                                     f"{list(arg.shape)}")

    def example_inputs(self, sizes: Optional[dict[str, int]] = None, seed: int = 0) -> tuple:
        """Random inputs of the model's types; dynamic dims take ``sizes[name]`` (default 4)."""
        sizes = sizes or {}
        gen = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.input_specs:
            shape = [d if isinstance(d, int) else sizes.get(d, 4) for d in spec.dims]
            if spec.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(spec.dtype))
            elif spec.dtype == torch.bool:
                out.append(torch.randint(0, 2, shape, generator=gen).bool())
            else:
                out.append(torch.randint(0, 100, shape, generator=gen).to(spec.dtype))
        return tuple(out)

    def dynamic_dims(self) -> list[dict[int, str]]:
        """Per input, axis -> the name of its dynamic dim."""
        return [{axis: d for axis, d in enumerate(spec.dims) if isinstance(d, str)}
                for spec in self.input_specs]


_PART = re.compile(r"[^0-9A-Za-z_]")
_RESERVED = set(dir(torch.nn.Module)) | {"program", "model_name", "input_specs"}


class _Paths:
    """Module paths for dotted ONNX names: identifiers (an ONNX name may hold any character),
    none an attribute of ``nn.Module``, and none both a tensor and a prefix ("a.b" and "a.b.c")."""

    def __init__(self):
        self.leaves: set[tuple[str, ...]] = set()
        self.prefixes: set[tuple[str, ...]] = set()

    def add(self, name: str) -> tuple[str, ...]:
        parts = [_PART.sub("_", p) or "_" for p in name.split(".")]
        parts = [f"{p}_" if p in _RESERVED or p.startswith("_const_paths") else p for p in parts]
        while any(tuple(parts[:i]) in self.leaves for i in range(1, len(parts))):
            parts = ["_".join(parts)]      # a prefix is a tensor already: flatten
        path, n = tuple(parts), 0
        while path in self.leaves or path in self.prefixes:
            n += 1
            path = tuple(parts[:-1]) + (f"{parts[-1]}_{n}",)
        self.leaves.add(path)
        self.prefixes.update(path[:i] for i in range(1, len(path)))
        return path
