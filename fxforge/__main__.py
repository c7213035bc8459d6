"""Command line: ``python -m fxforge compile MODULE:FACTORY --example SPEC -o DIR`` (or
``compile model.onnx [--dim NAME=SIZE] -o DIR``), ``python -m fxforge onnx-ops [--opset N]``,
``python -m fxforge explain MODULE:FACTORY --example SPEC [-o report.html]``,
``python -m fxforge tune MODULE:FACTORY --example SPEC [--batch-sizes ...] [--budget-ms ...]``,
``python -m fxforge info DIR`` and ``python -m fxforge export-onnx DIR -o model.onnx``."""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import logging
import sys
from typing import Any, Optional, Sequence

import torch

from fxforge.errors import FxforgeError


class UsageError(FxforgeError, ValueError):
    """A bad command line: one ``error: ...`` line and exit code 2, as argparse reports its own."""


def _load_factory(ref: str):
    if ":" not in ref:
        raise UsageError(f"expected MODULE:FACTORY, got {ref!r}")
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{module_name!r} has no callable {attr!r}")
    return factory


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UsageError(f"--option takes KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _model_and_examples(args: argparse.Namespace):
    from fxforge.specs import parse_spec

    if args.factory.endswith(".onnx"):
        return _onnx_model_and_examples(args)
    if not args.example:
        raise UsageError("--example is required (one per input) for MODULE:FACTORY models")
    model = _load_factory(args.factory)()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{args.factory} returned {type(model).__name__}, not an nn.Module")
    specs = [parse_spec(s) for s in args.example]
    generator = torch.Generator().manual_seed(args.seed)
    examples = tuple(spec.example(generator) for spec in specs)
    return model.eval(), specs, examples, dict(_parse_option(o) for o in args.option)


def _onnx_model_and_examples(args: argparse.Namespace):
    """An ONNX file's model, input specs (``--example`` overrides; else from the model's input
    types, its dynamic dims sized by ``--dim``) and examples."""
    from fxforge.onnx import from_onnx, onnx_input_specs
    from fxforge.specs import parse_spec

    model = from_onnx(args.factory, compile=False)
    sizes = dict(_parse_dim(d) for d in args.dim)
    specs = [parse_spec(s) for s in args.example] if args.example else \
        onnx_input_specs(model, sizes)
    generator = torch.Generator().manual_seed(args.seed)
    examples = tuple(spec.example(generator) for spec in specs)
    return model, specs, examples, dict(_parse_option(o) for o in args.option)


def _parse_dim(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not size.strip().isdigit():
        raise UsageError(f"--dim takes NAME=SIZE, got {text!r}")
    return name.strip(), int(size)


def cmd_onnx_ops(args: argparse.Namespace) -> int:
    from fxforge.onnx import coverage_table
    print(coverage_table(args.opset))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import fxforge
    from fxforge.specs import export_dynamic_shapes

    model, specs, examples, options = _model_and_examples(args)
    dynamic_shapes = export_dynamic_shapes(specs)
    if dynamic_shapes is not None and args.factory.endswith(".onnx"):
        dynamic_shapes = (dynamic_shapes,)     # OnnxModule.forward(*inputs)
    artifact = fxforge.aot_compile(model, examples, args.output, dynamic_shapes=dynamic_shapes,
                                   **options)
    print(f"wrote {artifact}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import fxforge

    model, _, examples, options = _model_and_examples(args)
    report = fxforge.explain(model, examples, **options)
    print(report.text)
    if args.output:
        report.save(args.output)
        print(f"wrote {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import fxforge
    artifact = fxforge.load(args.artifact)
    print(artifact)
    print(json.dumps({k: artifact.manifest[k] for k in ("versions", "options", "inputs", "ranges")},
                     indent=1))
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import fxforge
    from fxforge.irgraph.onnx_export import DEFAULT_OPSET   # needs onnx: loaded on use only
    opset = args.opset or DEFAULT_OPSET
    model = fxforge.export_onnx(args.artifact, args.output, opset=opset,
                                quant_format=args.quant_format)
    print(f"wrote {args.output} (opset {opset}, {len(model.graph.node)} nodes)")
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", help="MODULE:FACTORY, a callable returning the nn.Module, "
                        "or an .onnx file")
    parser.add_argument("--example", action="append", default=[], metavar="SPEC",
                        help="an input spec, e.g. 'int64[1,seq=16:2..512]{0..1000}' (repeat per "
                        "input; an ONNX model's default: its input types)")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                        help="an ONNX model's dynamic dim: its example size (default 8)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="seed for the example inputs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fxforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile a model into an AOT artifact directory")
    _model_arguments(comp)
    comp.add_argument("-o", "--output", required=True, help="artifact directory to write")
    comp.set_defaults(run=cmd_compile)
    expl = sub.add_parser("explain", help="compile and report fusion groups, kernels and fallbacks")
    _model_arguments(expl)
    expl.add_argument("-o", "--output", help="also write the report: .html, .svg or .txt")
    expl.set_defaults(run=cmd_explain)
    ops = sub.add_parser("onnx-ops", help="print the ONNX ops fxforge imports")
    ops.add_argument("--opset", type=int, default=None, help="default: the newest")
    ops.set_defaults(run=cmd_onnx_ops)
    info = sub.add_parser("info", help="load an artifact and print its manifest")
    info.add_argument("artifact")
    info.set_defaults(run=cmd_info)
    onnx_cmd = sub.add_parser("export-onnx", help="write an artifact's optimized graph as ONNX")
    onnx_cmd.add_argument("artifact", help="artifact directory (from `fxforge compile`)")
    onnx_cmd.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    onnx_cmd.add_argument("--opset", type=int, help="ONNX opset (default 23: the first with Attention)")
    onnx_cmd.add_argument("--quant-format", default="auto", choices=("auto", "qdq", "matmulnbits"))
    onnx_cmd.set_defaults(run=cmd_export_onnx)
    from fxforge.tune import add_parser
    add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except FxforgeError as exc:   # bad input of any kind: one line, as argparse's own errors
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
