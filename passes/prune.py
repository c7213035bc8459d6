"""Structured pruning (``options={"prune": {...}}``, :mod:`fxforge.passes.prune_spec`): whole
decoder blocks and MLP channels leave the graph, so every later pass, the KV cache and every
backend work on smaller shapes (unlike masks of zeros, which speed up nothing).

The pass runs first in the pipeline (after CSE), on plain ATen, so projection and attention
fusion, constant folding, quantization and the KV-cache pass all see the pruned model. It
measures on the calibration inputs (the compile's example inputs: give real text):

* layers: a block's Block Influence (ShortGPT, Men et al., 2024) is ``1 - mean cos(x_in,
  x_out)`` over the calibration tokens, the block's input and output on the residual stream;
  the ``layers`` least influential go (``drop_layers`` names them instead). A removed block's
  output is replaced by its input: the residual stream passes through, and its attention (with
  its KV cache) and its MLP are dead code.
* attention heads, whole kv groups at a time: :mod:`fxforge.passes.prune_heads` (before the
  MLPs: its measurement runs on the graph the blocks left);
* MLP channels: :mod:`fxforge.passes.prune_mlp`.

What was removed, per block, attention layer and MLP, with the bytes and FLOPs saved, is kept in
``ir.info["prune"]`` (``fxforge/prune_report.py`` turns it into a table).
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch

from fxforge.irgraph import IRGraph
from fxforge.irgraph.graph import hoist_get_attrs, tensor_identity
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.attention_calib import measured_once
from fxforge.passes.gptq import calibration_inputs, observe_values
from fxforge.passes.prune_heads import apply_heads, choose_heads
from fxforge.passes.prune_mlp import apply_mlps, choose_mlps
from fxforge.passes.prune_sites import Block, decoder_blocks, weight_name
from fxforge.passes.prune_spec import PruneSpec, PruneSpecError

log = logging.getLogger("fxforge.passes.prune")


def prune_pass(spec: PruneSpec) -> Pass:
    return Pass("prune", functools.partial(prune, spec=spec),
                f"structured pruning ({spec})")


def prune(ir: IRGraph, spec: PruneSpec) -> PassResult:
    """Remove the blocks, then the heads, then the MLP channels ``spec`` asks for (module
    docstring). What to remove is measured once per model (``attention_calib.measured_once``:
    the same weights give the same choice), so every graph dynamo makes of one model (the first
    call's static shape, the dynamic one after it, a draft) prunes the same parts."""
    choice = measured_once(ir, ("prune", str(spec)), lambda: _choose(ir, spec))
    constants_before = constant_bytes(ir)
    report: dict = {"spec": str(spec), "layers": [], "heads": [], "mlp": [], "declined": {},
                    "heads_declined": {}}
    if choice["blocks"]:
        report["layers"] = drop_blocks(ir, choice["blocks"], choice["influence"])
        ir.gm.graph.eliminate_dead_code()
    if spec.heads:
        report["heads"], report["heads_declined"] = apply_heads(ir, choice["heads"])
        ir.gm.graph.eliminate_dead_code()
    if spec.mlp:
        report["mlp"], report["declined"] = apply_mlps(ir, choice["mlp"])
        ir.gm.graph.eliminate_dead_code()
    drop_unused_constants(ir)
    hoist_get_attrs(ir.gm.graph)   # the new weights join the constants at the top
    report["bytes_before"] = constants_before
    report["bytes_after"] = constant_bytes(ir)
    ir.info["prune"] = report
    for name, why in report["declined"].items():
        log.debug("prune: linear %s is not an MLP's down projection: %s", name, why)
    for name, why in report["heads_declined"].items():
        log.info("prune: the heads of attention %s stay: %s", name, why)
    return PassResult(ir, {"blocks": len(report["layers"]), "attention": len(report["heads"]),
                           "mlps": len(report["mlp"])})


def _choose(ir: IRGraph, spec: PruneSpec) -> dict:
    """Which blocks go (by index) and what each MLP keeps, measured on a copy of ``ir`` with
    the calibration inputs (the MLPs after the blocks are gone: they see what remains)."""
    inputs = calibration_inputs()
    if spec.needs_calibration and inputs is None:
        raise PruneSpecError(f"prune={str(spec)!r} measures on calibration inputs and has none: "
                             "compile with example inputs (real text), or use score='magnitude',"
                             " compensate='off' and drop_layers")
    work = ir.copy(recompile=False)
    blocks = decoder_blocks(work)
    wanted = spec.layers or len(spec.drop_layers)
    if wanted > len(blocks) or any(i >= len(blocks) for i in spec.drop_layers):
        raise PruneSpecError(f"prune: {len(blocks)} removable block(s) found (the last block of "
                             f"each stack stays), cannot remove {spec.drop_layers or wanted}")
    influence = block_influence(work, blocks, inputs) if inputs is not None and wanted else {}
    chosen = list(spec.drop_layers)
    if spec.layers:
        chosen = sorted(range(len(blocks)), key=influence.__getitem__)[:spec.layers]
    drop_blocks(work, chosen, influence)
    work.gm.graph.eliminate_dead_code()
    heads = choose_heads(work, spec, inputs) if spec.heads else []
    if heads:
        apply_heads(work, heads)
        work.gm.graph.eliminate_dead_code()
    return {"blocks": sorted(chosen), "influence": influence, "heads": heads,
            "mlp": choose_mlps(work, spec, inputs) if spec.mlp else []}


def drop_blocks(ir: IRGraph, chosen: Sequence[int], influence: dict) -> list[dict]:
    """Remove the blocks of ``ir`` at indices ``chosen``; one report row each."""
    blocks = decoder_blocks(ir)
    rows = []
    for index in sorted(chosen, reverse=True):   # later first: each end is still the block's own
        block = blocks[index]
        rows.append({"kind": "layer", "index": index, "name": block.name,
                     "influence": influence.get(index),
                     **_named_sizes(ir, block.name + ".")})
        block.end.replace_all_uses_with(block.start)
    log.info("prune: removed block(s) %s of %d", sorted(chosen), len(blocks) + 1)
    return sorted(rows, key=lambda r: r["index"])


def block_influence(ir: IRGraph, blocks: list[Block], inputs: Sequence) -> dict[int, float]:
    """Block index -> ``1 - mean cos(input, output)`` over the calibration tokens."""
    stream = {b.start for b in blocks} | {b.end for b in blocks}
    values: dict = {}
    observe_values(ir, inputs, list(stream),
                   lambda node, value: values.__setitem__(node, value.detach().float()))
    out = {}
    for block in blocks:
        x_in = values[block.start].reshape(-1, values[block.start].shape[-1])
        x_out = values[block.end].reshape(-1, x_in.shape[-1])
        out[block.index] = float(1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
                                 .mean())
    return out


def _named_sizes(ir: IRGraph, prefix: str) -> dict:
    """How many model weights, and bytes, have names starting with ``prefix`` (none: ".")."""
    seen, count, size = set(), 0, 0
    for node in ir.gm.graph.nodes:
        if node.op == "get_attr" and prefix != "." and weight_name(node).startswith(prefix) \
                and node.target not in seen:
            seen.add(node.target)
            value = getattr(ir.gm, node.target)
            count, size = count + value.numel(), size + value.numel() * value.element_size()
    return {"weights_saved": count, "bytes_saved": size}


def constant_bytes(ir: IRGraph) -> int:
    """Bytes of the constants ``ir`` reads, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for node in ir.gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(ir.gm, node.target)
            if not isinstance(value, torch.Tensor):
                continue
            key = tensor_identity(value)
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
    return total


def drop_unused_constants(ir: IRGraph) -> None:
    """Pruned-away weights leave the module too (else the IR would hold both copies)."""
    used = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n in ir.gm._buffers if n not in used]:
        del ir.gm._buffers[name]
