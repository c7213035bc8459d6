"""MLP channel pruning: each MLP keeps its most important hidden channels, every shape shrinks.

For each :class:`~fxforge.passes.prune_sites.ChannelGroup`, channel j is scored by

* ``wanda`` (Sun et al., 2023, summed per channel as its structured variants do):
  ``‖x_j‖₂ · Σ_n |W_down[j, n]|``, with ``x`` the down projection's input on the calibration
  tokens (a channel that is large and read by large weights matters);
* ``magnitude``: the L1 norm of every weight of the channel (its producer rows and its down row),
  the activation-blind baseline.

The lowest scores go, rounded so that the kept count stays a multiple of :data:`ALIGN` (the
kernels' tiles and the int4 groups divide it). The new weights are sliced here, at compile time
(a quantized linear in gpt-fast is no more than that: a module with its tensors in plain sight),
and every op in between gets its channel count rewritten: split sizes, slice bounds, reshape
sizes. Bias compensation (FLAP, An et al., 2024) adds the removed channels' mean contribution
``mean(x[:, removed]) @ W_down[removed]`` to the down projection's bias; ``compensate="auto"``
keeps it where it lowers the down projection's output error on held-out calibration tokens
(fitted on the even rows, judged on the odd ones).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.capture import WEIGHT_NAME_KEY
from fxforge.irgraph.views import Addmm, Linear, LinearOperands, Mm, Slice, Split
from fxforge.passes.gptq import observe_linear_inputs
from fxforge.passes.prune_sites import RESHAPES, ChannelGroup, channel_groups
from fxforge.passes.prune_spec import PruneSpec
from fxforge.passes.quantize import add_transposed, weight_constant

aten = torch.ops.aten
ALIGN = 32          # kept channels are a multiple of this (when the width is)
MAX_ROWS = 4096     # calibration rows kept per MLP for the compensation check


@dataclasses.dataclass(frozen=True)
class MlpChoice:
    """What one MLP keeps: measured once per model, applied to every graph of it."""
    name: str                          # the down projection's weight name
    keep: torch.Tensor                 # kept channel indices, ascending
    delta: Optional[torch.Tensor]      # the compensation added to the down bias, or None
    gain: Optional[float]              # held-out error ratio with/without compensation


def choose_mlps(ir: IRGraph, spec: PruneSpec, inputs: Optional[Sequence]) -> list[MlpChoice]:
    """Per MLP of ``ir`` (graph order) the channels it keeps and its compensation."""
    groups, _ = channel_groups(ir)
    rows = linear_input_rows(ir, [g.down for g in groups], inputs) if inputs is not None else {}
    choices = []
    for group in groups:
        x = rows.get(group.down)
        down = weight_value(ir, LinearOperands.of(group.down).weight)          # [I, N]
        keep = kept_channels(channel_scores(ir, group, down, x, spec.score),
                             keep_count(group.width, spec.mlp))
        delta, gain = _compensation(x, down, _complement(keep, group.width), spec.compensate)
        choices.append(MlpChoice(group.name, keep, delta, gain))
    return choices


def apply_mlps(ir: IRGraph, choices: list[MlpChoice]) -> tuple[list[dict], dict]:
    """Prune ``ir``'s MLPs as ``choices`` say: one report row per MLP, and why each other
    linear is not an MLP's down projection."""
    groups, declined = channel_groups(ir)
    if [g.name for g in groups] != [c.name for c in choices]:
        raise ValueError(f"prune: this graph's MLPs {[g.name for g in groups]} are not those "
                         f"measured ({[c.name for c in choices]})")
    report = []
    for group, choice in zip(groups, choices):
        report.append(_rewrite(ir, group, choice.keep, choice.delta) | {
            "kind": "mlp", "name": group.name, "producers": group.producer_rows(),
            "width": group.width, "kept": len(choice.keep), "kept_channels": choice.keep.tolist(),
            "compensated": choice.delta is not None, "compensation_gain": choice.gain})
    return report, declined


def keep_count(width: int, fraction: float) -> int:
    """How many of ``width`` channels stay when ``fraction`` of them go (:data:`ALIGN`-aligned
    where ``width`` is, never all removed)."""
    kept = width - round(width * fraction)
    if width % ALIGN == 0 and width >= 2 * ALIGN:
        kept = max(ALIGN, ALIGN * round(kept / ALIGN))
    return max(1, min(width, kept))


def kept_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` best-scoring channel indices, ascending (ties: the lower index)."""
    order = torch.argsort(-scores.double(), stable=True)
    return torch.sort(order[:count]).values


def channel_scores(ir: IRGraph, group: ChannelGroup, down: torch.Tensor,
                   x: Optional[torch.Tensor], score: str) -> torch.Tensor:
    down_l1 = down.abs().sum(dim=1).double()
    if score == "wanda":
        if x is None:
            raise ValueError("prune score 'wanda' needs calibration inputs (the compile's "
                             "example inputs); use score='magnitude' without them")
        return x.double().pow(2).sum(dim=0).sqrt() * down_l1
    total = down_l1.clone()
    for producer, offsets in group.producers.items():
        weight = weight_value(ir, LinearOperands.of(producer).weight).abs().double()   # [K, n_out]
        for offset in offsets:
            total += weight[:, offset:offset + group.width].sum(dim=0)
    return total


def linear_input_rows(ir: IRGraph, nodes: list[fx.Node], inputs: Sequence) -> dict:
    """linear node -> its input activations ``[rows, K]`` on the calibration inputs (at most
    :data:`MAX_ROWS`, evenly spaced)."""
    def fold(node, _, rows):
        step = max(1, -(-rows.shape[0] // MAX_ROWS))
        return rows[::step].clone()
    return observe_linear_inputs(ir, inputs, nodes, fold)


def _compensation(x: Optional[torch.Tensor], down: torch.Tensor, removed: torch.Tensor,
                  mode: str) -> tuple[Optional[torch.Tensor], Optional[float]]:
    """(the bias delta ``[N]`` or None, the held-out error ratio with/without it)."""
    if mode == "off" or x is None or removed.numel() == 0:
        return None, None
    lost = x[:, removed].double() @ down[removed].double()   # what the removed channels added
    fit, held_out = lost[0::2], lost[1::2]
    gain = None
    if held_out.shape[0] > 0:
        without = held_out.pow(2).sum()
        gain = float((held_out - fit.mean(dim=0)).pow(2).sum() / without) if without > 0 else 1.0
    if mode == "auto" and (gain is None or gain >= 1.0):
        return None, gain
    return lost.mean(dim=0).to(down.dtype), gain


# ---------------------------------------------------------------- the rewrite

def _rewrite(ir: IRGraph, group: ChannelGroup, keep: torch.Tensor,
             delta: Optional[torch.Tensor]) -> dict:
    """Slice the weights to ``keep``, rewrite the channel counts in between; weights and bytes
    saved."""
    width, kept = group.width, keep.numel()
    size = weight_value(ir, LinearOperands.of(group.down).weight).element_size()
    saved = 0
    for producer, offsets in group.producers.items():
        columns = torch.cat([offset + keep for offset in offsets])
        saved += slice_linear(ir, producer, columns=columns)
    for node, index in group.constants:
        value = weight_value(ir, node.args[index])
        const = ir.add_constant("pruned_channels", value.index_select(-1, keep).contiguous(), node)
        node.update_arg(index, const)
    for node in group.region:   # in graph order: each reads metadata already updated
        _rescale_channels(node, width, kept)
        ir.infer(node)
    saved += slice_linear(ir, group.down, rows=keep, delta=delta)
    return {"weights_saved": saved, "bytes_saved": saved * size}


def slice_linear(ir: IRGraph, node: fx.Node, columns: Optional[torch.Tensor] = None,
                 rows: Optional[torch.Tensor] = None, delta: Optional[torch.Tensor] = None) -> int:
    """Keep ``columns`` (outputs) or ``rows`` (inputs) of the linear's ``[K, N]`` weight (and
    its bias's columns); add ``delta`` to its bias. Returns how many weights went."""
    lin = LinearOperands.of(node)
    weight = weight_value(ir, lin.weight)
    sliced = weight.index_select(1, columns) if columns is not None else weight.index_select(0, rows)
    new_weight = add_transposed(ir, "pruned_weight", sliced.t(), node)
    new_weight.all_input_nodes[0].meta[WEIGHT_NAME_KEY] = _name(lin.weight)
    bias = weight_value(ir, lin.bias) if lin.bias is not None else None
    if bias is not None and columns is not None:
        bias = bias.index_select(0, columns)
    if delta is not None:
        bias = delta if bias is None else bias + delta
    new_bias = ir.add_constant("pruned_bias", bias.contiguous(), node) if bias is not None else None
    set_operands(ir, node, new_weight, new_bias)
    return weight.numel() - sliced.numel()


def set_operands(ir: IRGraph, node: fx.Node, weight: fx.Node,
                 bias: Optional[fx.Node]) -> fx.Node:
    """Give the linear ``node`` this weight and bias (None: none); returns the node that now
    computes it: ``node``, or the ``addmm`` a bias-free ``mm`` became (pruning's compensation
    bias) or the ``mm`` an ``addmm`` became (a row-parallel shard off rank 0)."""
    if (lin := Linear.of(node)) is not None:
        lin.replace(weight=weight, bias=bias)
    elif (addmm := Addmm.of(node)) is not None and bias is not None:
        addmm.replace(mat2=weight, input=bias)
    elif (mm := Mm.of(node)) is not None and bias is None:
        mm.replace(mat2=weight)
    else:
        x = addmm.mat1 if addmm is not None else Mm.of(node).input
        target, args = (aten.mm.default, (x, weight)) if bias is None else \
            (aten.addmm.default, (bias, x, weight))
        with ir.gm.graph.inserting_before(node):
            new = ir.gm.graph.call_function(target, args)
        ir.infer(new)
        node.replace_all_uses_with(new)
        ir.gm.graph.erase_node(node)
        return new
    ir.infer(node)
    return node


def _rescale_channels(node: fx.Node, width: int, kept: int) -> None:
    """A count of hidden channels (a multiple of ``width``) in ``node``'s arguments becomes the
    same multiple of ``kept``: split sizes, slice bounds, the last size of a reshape."""
    def scaled(size):
        return size // width * kept if isinstance(size, int) and size > 0 and size % width == 0 \
            else size
    if (split := Split.of(node)) is not None:
        if split.split_sizes is not None:
            split.replace(split_sizes=[scaled(s) for s in split.split_sizes])
        elif split.split_size is not None:
            split.replace(split_size=scaled(split.split_size))
    elif (sl := Slice.of(node)) is not None:
        sl.replace(start=scaled(sl.start), end=scaled(sl.end))
    elif node.target in RESHAPES:
        shape = list(node.args[1])
        shape[-1] = scaled(shape[-1])
        node.update_arg(1, shape)


def weight_value(ir: IRGraph, node: fx.Node) -> torch.Tensor:
    found = weight_constant(ir, node)
    if found is None:
        raise ValueError(f"prune: {node} is not a constant weight")
    return found[0].detach()


def _name(node: fx.Node) -> str:
    found = node
    while found.op != "get_attr":
        found = found.all_input_nodes[0]
    return found.meta.get(WEIGHT_NAME_KEY, "")


def _complement(keep: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()
