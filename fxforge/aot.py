"""Ahead-of-time artifacts: compile once, load and run without the model's code or retracing.

An artifact directory holds:
  * ``graph.json``: the optimized IR (nodes, targets, arguments, typed metadata);
  * ``weights.safetensors``: every constant the graph reads (tied weights stored once);
  * ``manifest.json``: versions, options, the input signature and dynamic-size ranges, the
    output structure, and the SHA-256 of every file (checked on load: a guard against
    accidents, not attackers, who can rewrite the manifest too).

An artifact is data: ``load`` evaluates, imports, unpickles and compiles nothing it says
(:mod:`fxforge.artifact_checks`, :mod:`fxforge.irgraph.serialize`; README, "Trust model").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import sympy
import torch
from torch.utils import _pytree as pytree

import fxforge
from fxforge.artifact_checks import (check_graph_inputs, check_manifest, check_tuning_bundle,
                                     link_constants, load_weights, read_options)
from fxforge.compiler import check_against_eager
from fxforge.distributed import (check_rank, finish_set, manifest_entry, rank_folder,
                                 this_ranks_folder)
from fxforge.errors import ArtifactError, InputSpecError, VerificationError
from fxforge.irgraph import (SerializationError, TensorMeta, capture_export, ir_from_json,
                             ir_to_json)
from fxforge.irgraph.collectives import rebind_group
from fxforge.irgraph.graph import tensor_identity
from fxforge.irgraph.meta import restore_example_values
from fxforge.options import CompileOptions, parse_options
from fxforge.orchestrate import compile_graph, tuning_session
from fxforge.specs import TensorSignature, check_inputs

log = logging.getLogger("fxforge.aot")
MANIFEST, GRAPH, WEIGHTS = "manifest.json", "graph.json", "weights.safetensors"
TUNING = "tuning.json"   # the tuning-cache entries the artifact was lowered with (if any)
STEP_GRAPH = "step_graph.json"   # kv_cache=True: the KV-cache pass's cached step graph
ARTIFACT_FORMAT = 1


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"fxforge": fxforge.__version__, "torch": torch.__version__, "triton": triton_version}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _builtin_spec(spec: pytree.TreeSpec) -> bool:
    if spec.is_leaf():
        return True
    return spec.type in (tuple, list, dict) and all(_builtin_spec(c) for c in spec.children())


def _dedup_constants(constants: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """safetensors refuses shared storage: keep one copy per tensor, record the aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in constants.items():
        key = tensor_identity(tensor)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().clone()
    return unique, aliases


def aot_compile(model: torch.nn.Module, example_inputs: Sequence[Any], out_dir: str | os.PathLike,
                dynamic_shapes: Any = None, **options: Any) -> "Artifact":
    """Capture ``model`` with torch.export, optimize, write an artifact, load it (the one
    lowering, in the autotuning session whose results ship with it) and check it against eager."""
    from safetensors.torch import save_file

    opts = parse_options(options)
    model = model.eval()
    example_inputs = tuple(example_inputs)
    with torch.no_grad():
        ir = capture_export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        flat_inputs, in_spec = pytree.tree_flatten((example_inputs, {}))
        prepared = compile_graph(ir, opts, stages=("passes", "kv_step"), calibration=flat_inputs)
        ir, step = prepared.ir, prepared.plan
        flat_expected, out_spec = pytree.tree_flatten(model(*example_inputs))
        if opts.lossy:   # the artifact must compute the optimized graph's meaning
            flat_expected = pytree.tree_flatten(ir.gm(*flat_inputs))[0]
        kv_expected = flat_expected   # an int8 cache's rounding is the step graph's alone
        if step is not None and opts.int8_kv_cache:
            from fxforge.kv_runtime import reference_prefill
            kv_expected = reference_prefill(step, flat_inputs, opts.max_seq_len)
    graph_text, step_text = _graph_json(ir), _graph_json(step.ir) if step is not None else None
    out = rank_folder(Path(out_dir), opts)   # tensor_parallel: this rank's own folder
    out.mkdir(parents=True, exist_ok=True)
    unique, aliases = _dedup_constants(_all_constants(ir, step))
    save_file(unique, str(out / WEIGHTS))
    (out / GRAPH).write_text(graph_text)
    shipped = [GRAPH, WEIGHTS]
    (out / STEP_GRAPH).unlink(missing_ok=True)
    if step_text is not None:
        (out / STEP_GRAPH).write_text(step_text)
        shipped.append(STEP_GRAPH)
    (out / TUNING).unlink(missing_ok=True)
    metas = [p.meta.get("fxf") for p in ir.placeholders()]
    if not all(isinstance(m, TensorMeta) for m in metas):
        raise ArtifactError("AOT artifacts take tensor inputs only")
    names = user_dim_names(metas, dynamic_shapes)
    signature = [TensorSignature(p.name, m.dtype, tuple(_rename(d, names) for d in m.shape)).to_json()
                 for p, m in zip(ir.placeholders(), metas)]
    # Ranges of the dynamic sizes themselves: a derived size's (``2*s0``) follows from its root's.
    ranges = {names.get(k, k): v for k, v in ir.info.get("range_constraints", {}).items()
              if k.isidentifier()}
    manifest = {
        "format": ARTIFACT_FORMAT, "versions": _versions(), "options": opts.to_dict(),
        "model": type(model).__qualname__, "inputs": signature,
        "ranges": ranges, "aliases": aliases,
        "in_spec": pytree.treespec_dumps(in_spec) if _builtin_spec(in_spec) else None,
        "out_spec": pytree.treespec_dumps(out_spec) if _builtin_spec(out_spec) else None,
        "kernels": {},  # always empty: a load generates kernels from the graph, never from source
        "kv_cache": step.to_json() if step is not None else None,
        "files": {name: _sha256(out / name) for name in shipped},
        "tensor_parallel": manifest_entry(opts, (out / WEIGHTS).stat().st_size),
    }
    if manifest["out_spec"] is None:
        log.warning("fxforge: %s returns %s; the artifact returns its tensors as a flat tuple",
                    type(model).__name__, out_spec.type.__name__ if out_spec.type else "?")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with tuning_session(opts.autotune) as active:   # the load's lowering tunes in this session
        artifact = load(out)
    if active is not None and active.keys and active.cache.export(out / TUNING, active.keys):
        manifest["files"][TUNING] = _sha256(out / TUNING)   # what it tuned ships with it
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        artifact.manifest = manifest
    else:
        (out / TUNING).unlink(missing_ok=True)
    _check_artifact(artifact, example_inputs, flat_inputs, flat_expected, ir.info, kv_expected)
    finish_set(Path(out_dir), opts)
    return artifact


def _check_artifact(artifact: "Artifact", example_inputs: tuple, flat_inputs: list,
                    flat_expected: list, info: dict, kv_expected: Optional[list] = None) -> None:
    """The artifact, as loaded, against eager: its graph, and its step graph running the
    example as a prefill (kv_cache=True) against ``kv_expected`` (default: the same as the
    graph). One that differs is no artifact: its manifest goes."""
    precision = info.get("precision", "fp32")
    try:
        with torch.no_grad():
            check_against_eager(list(artifact.lowered(*flat_inputs)), flat_expected, precision)
        if artifact.kv is not None:
            flat_outputs = pytree.tree_flatten(artifact(*example_inputs))[0]
            check_against_eager(flat_outputs, kv_expected if kv_expected is not None
                                else flat_expected, precision)
    except VerificationError:
        (artifact.path / MANIFEST).unlink(missing_ok=True)
        raise


def _graph_json(ir) -> str:
    """The IR as an artifact stores it; an ArtifactError if it holds what a load would refuse."""
    try:
        return json.dumps(ir_to_json(ir))
    except SerializationError as exc:
        raise ArtifactError(f"this graph cannot be stored as an artifact: {exc}") from None


def _all_constants(ir, step) -> dict[str, torch.Tensor]:
    """The graph's constants and the step graph's (the same tensors under the same names)."""
    constants = dict(ir.constants())
    for name, value in (step.ir.constants().items() if step is not None else ()):
        if name in constants and constants[name] is not value and not torch.equal(constants[name], value):
            raise ArtifactError(f"the step graph's constant {name} differs from the graph's")
        constants[name] = value
    return constants


def user_dim_names(metas: list, dynamic_shapes: Any) -> dict[str, str]:
    """Export's symbols (``s75``) -> the names the user gave their dynamic dims (``seq``)."""
    names: dict[str, str] = {}
    if not isinstance(dynamic_shapes, (tuple, list)):
        return names
    # one entry per tensor input, also where a ``forward(*args)`` nests them in a tuple
    per_input = pytree.tree_flatten(dynamic_shapes, is_leaf=lambda x: x is None or isinstance(x, dict))[0]
    for meta, dims in zip(metas, per_input):
        for axis, dim in (dims or {}).items():
            expr = meta.shape[axis]
            user = getattr(dim, "__name__", None)
            if isinstance(expr, sympy.Symbol) and user and user not in names.values():
                names[str(expr)] = user
    return names


def _rename(dim: Any, names: dict[str, str]) -> Any:
    if isinstance(dim, sympy.Expr):
        return dim.subs({s: sympy.Symbol(names[s.name]) for s in dim.free_symbols if s.name in names})
    return dim


class Artifact:
    """A loaded artifact: call it like the model (positional tensor inputs)."""

    def __init__(self, path: Path, manifest: dict, ir, options: CompileOptions,
                 signature: list[TensorSignature], kv_plan=None):
        """``signature``: the manifest's inputs, as ``check_manifest`` read them; ``kv_plan``:
        the KV-cache plan over the step graph (kv_cache=True)."""
        self.path, self.manifest, self.ir, self.options = path, manifest, ir, options
        self.signature = signature
        self.ranges = {k: tuple(v) for k, v in manifest["ranges"].items()}
        self.in_spec = pytree.treespec_loads(manifest["in_spec"]) if manifest["in_spec"] else None
        self.out_spec = pytree.treespec_loads(manifest["out_spec"]) if manifest["out_spec"] else None
        tuned = path / TUNING if TUNING in manifest["files"] else None
        # shipped tuning results are used, never re-measured on load
        built = compile_graph(ir, options, stages=("lower",), plan=kv_plan, tuning_overlay=tuned,
                              measure=False)
        self.lowered = built.lowered
        self.kv = built.kv   # kv_cache=True: the transparent incremental decoder, as compiled
        self.tuning = built.tuning

    def __call__(self, *args: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, {}))
        if self.in_spec is not None and spec != self.in_spec:
            expected_args = self.in_spec.children()[0].num_children
            if len(args) != expected_args:
                names = ", ".join(s.name for s in self.signature)
                raise InputSpecError(f"expected {expected_args} inputs ({names}), got {len(args)}")
            raise InputSpecError("inputs are nested differently from the example inputs the "
                                 f"artifact was compiled with: {spec} vs {self.in_spec}")
        check_inputs(flat, self.signature, self.ranges)
        with torch.no_grad():
            outputs = self.kv(flat) if self.kv is not None else list(self.lowered(*flat))
        return pytree.tree_unflatten(outputs, self.out_spec) if self.out_spec else tuple(outputs)

    def __repr__(self) -> str:
        sig = ", ".join(s.describe() for s in self.signature)
        return f"Artifact({str(self.path)!r}, model={self.manifest['model']}, inputs=[{sig}])"


def load(path: str | os.PathLike, check_versions: bool = True) -> Artifact:
    """Load an artifact written by ``aot_compile``; every problem is an ArtifactError naming it."""
    stored = read_artifact(path, check_versions)
    root, manifest, signature = stored.root, stored.manifest, stored.signature
    ir, step_ir = stored.ir, stored.step_ir
    for graph_ir in (ir, step_ir) if step_ir is not None else (ir,):
        why = restore_example_values(graph_ir.gm, _size_hints(graph_ir, manifest, signature))
        if why is not None:
            log.warning("fxforge: artifact %s: no example values for a graph (%s); fused kernels "
                        "that need them run op by op", root, why)
    kv_plan = _kv_plan(root, step_ir, manifest) if step_ir is not None else None
    try:
        return Artifact(root, manifest, ir, stored.options, signature, kv_plan)
    except Exception as exc:   # lowering runs what a hostile graph names: no raw traceback
        raise ArtifactError(f"artifact {root}: building its kernels failed "
                            f"({type(exc).__name__}: {exc})") from exc


@dataclasses.dataclass
class StoredArtifact:
    """An artifact's files as read and checked, nothing lowered: what ``load`` builds on and
    what an export (``fxforge.export_onnx``) reads the optimized graph from."""
    root: Path
    manifest: dict
    signature: list[TensorSignature]
    options: CompileOptions
    ir: Any
    step_ir: Any = None


def read_artifact(path: str | os.PathLike, check_versions: bool = True) -> StoredArtifact:
    """Read and check an artifact's files (hashes, versions, options, graphs); ArtifactError
    naming any problem. The graphs are rebuilt with their weights but not lowered."""
    from safetensors import SafetensorError

    root = this_ranks_folder(Path(path))
    manifest, signature = _read_manifest(root)
    group = check_rank(root, manifest)   # tensor_parallel: this rank's, and it fits
    for name, digest in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise ArtifactError(f"artifact {root}: {name} is missing")
        if _sha256(file) != digest:
            raise ArtifactError(f"artifact {root}: {name} was modified after compilation "
                                "(its SHA-256 does not match the manifest)")
    if check_versions:
        _check_versions(root, manifest["versions"])
    if TUNING in manifest["files"]:
        check_tuning_bundle(root, root / TUNING)
    try:
        constants = load_weights(root / WEIGHTS)
        graph = json.loads((root / GRAPH).read_text())
    except (SafetensorError, ValueError, OSError, RecursionError) as exc:
        raise ArtifactError(f"artifact {root}: cannot read its files: {exc}") from exc
    link_constants(root, manifest, constants)
    options = read_options(root, manifest)
    try:
        ir = ir_from_json(graph, constants)
    except Exception as exc:
        raise ArtifactError(f"artifact {root}: {GRAPH} cannot be rebuilt: {exc}") from exc
    step_ir = None
    if manifest.get("kv_cache"):
        try:
            step_ir = ir_from_json(json.loads((root / STEP_GRAPH).read_text()), constants,
                                   writable_inputs=manifest["kv_cache"]["caches"])
        except Exception as exc:
            raise ArtifactError(f"artifact {root}: {STEP_GRAPH} cannot be rebuilt: {exc}") from exc
    check_graph_inputs(root, ir, step_ir, manifest, signature)
    for graph_ir in (ir, step_ir) if group is not None else ():
        if graph_ir is not None:
            rebind_group(graph_ir, group)
    return StoredArtifact(root, manifest, signature, options, ir, step_ir)


def _kv_plan(root: Path, step_ir, manifest: dict):
    """The manifest's KV-cache plan over the step graph, or an ArtifactError saying why not."""
    from fxforge.passes.kv_cache import KVCachePlan
    try:
        return KVCachePlan.from_json(step_ir, manifest["kv_cache"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ArtifactError(f"artifact {root}: its KV-cache plan does not fit its step graph: "
                            f"{exc}") from exc


def _size_hints(ir, manifest: dict, signature: list[TensorSignature]) -> dict[str, int]:
    """Example size of each symbol of the graph's inputs: 16 clamped to the user's range."""
    hints: dict[str, int] = {}
    ranges = manifest["ranges"]
    for placeholder, entry in zip(ir.placeholders(), signature):
        meta = placeholder.meta.get("fxf")
        if not isinstance(meta, TensorMeta):
            continue
        for symbol, user in zip(meta.shape, entry.shape):
            low, high = ranges.get(str(user), (2, 16))
            if not isinstance(symbol, int):
                hints[str(symbol)] = max(low or 2, min(16, high or 16))
    return hints


def _read_manifest(root: Path) -> tuple[dict, list[TensorSignature]]:
    """The manifest, checked, and its input signature."""
    if not root.is_dir():
        raise ArtifactError(f"artifact {root} does not exist or is not a directory")
    file = root / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"artifact {root}: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"artifact {root}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"artifact {root}: {MANIFEST} is not a JSON object")
    needed = ("format", "versions", "options", "inputs", "ranges", "aliases", "files")
    missing = [k for k in needed if k not in manifest]
    if missing:
        raise ArtifactError(f"artifact {root}: {MANIFEST} lacks {missing}")
    if manifest["format"] != ARTIFACT_FORMAT:
        raise ArtifactError(f"artifact {root}: format {manifest['format']}, this fxforge reads "
                            f"format {ARTIFACT_FORMAT}")
    files = manifest["files"] if isinstance(manifest["files"], dict) else {}
    if not {GRAPH, WEIGHTS} <= set(files) <= {GRAPH, WEIGHTS, TUNING, STEP_GRAPH} or \
            (STEP_GRAPH in files) != bool(manifest.get("kv_cache")):
        raise ArtifactError(f"artifact {root}: {MANIFEST} lists files {sorted(files)}")
    return manifest, check_manifest(root, manifest)


def _check_versions(root: Path, built: dict) -> None:
    """fxforge and torch must match to the minor version: IR ops and schemas change between them."""
    now = _versions()
    for name in ("fxforge", "torch"):
        if _minor(built.get(name)) != _minor(now[name]):
            raise ArtifactError(f"artifact {root} was built with {name} {built.get(name)}, this is "
                                f"{name} {now[name]}; recompile it (or load(..., check_versions=False))")


def _minor(version: Optional[str]) -> Optional[tuple]:
    if not version:
        return None
    parts = version.split("+")[0].split(".")
    return tuple(parts[:2])
