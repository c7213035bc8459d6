"""The pass pipeline built from compile options: an explicit, named list."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Union

from fxforge.passes.base import Pass

# Order matters:
# * no-op removal and CSE expose shared inputs (projections, attention's q/k/v);
# * constant folding first turns mask buffers into constants the attention pass can prove causal;
# * attention fusion runs before epilogue fusion, so a score matmul is never taken for a linear;
# * horizontal and epilogue fusion and the precision pass leave weight-only work (concatenations,
#   casts) that constant folding then does once, at compile time;
# * vertical fusion runs last: it only tags groups, and a later pass could break one.
FRONT = ["narrow_scalar_inputs", "remove_noops", "cse", "fuse_projections", "constant_fold", "fuse_attention", "fuse_epilogues"]
BACK = ["constant_fold", "cse", "remove_noops", "dce", "fuse_elementwise"]


def default_pipeline(options: Mapping[str, Any],
                     weight_formats: Iterable[str] = ("dense",)) -> list[Union[str, Pass]]:
    """The pass names to run for ``options`` (``options["passes"]`` overrides it whole);
    ``weight_formats``: those the backend's kernels store natively (``Backend.weight_formats``):
    with "bf16", fp32 weights that are exactly bf16 get that format (lossless, once the weights
    are final: after the last constant folding)."""
    if options.get("passes") is not None:
        return list(options["passes"])
    precision = options.get("precision", "fp32")
    low = [f"precision_{precision}"] if precision != "fp32" else []
    # weight formats are set once the weights are final (after the last constant folding)
    formats: list[Union[str, Pass]] = []
    if options.get("quantize"):
        from fxforge.passes.quantize import parse_quantize, quantize_pass
        from fxforge.passes.quantize_plan import parse_budget
        formats.append(quantize_pass(parse_quantize(options["quantize"]),
                                     parse_budget(options.get("accuracy_budget"))))
    if "bf16" in weight_formats:
        formats.append("exact_bf16_weights")
    front: list[Union[str, Pass]] = list(FRONT)
    if options.get("prune"):   # first: every later pass, fusion included, sees the smaller model
        from fxforge.passes.prune import prune_pass
        from fxforge.passes.prune_spec import parse_prune
        front.insert(front.index("cse") + 1, prune_pass(parse_prune(options["prune"])))
    if options.get("tensor_parallel"):   # first too: every later pass sees this rank's shard
        from fxforge.passes.tensor_parallel import current_mesh, tensor_parallel_pass
        front.insert(front.index("cse") + 1, tensor_parallel_pass(current_mesh(
            options["tensor_parallel"])))
    if options.get("attention"):   # on the fused attention, before anything reads its sites
        from fxforge.passes.attention_modes import attention_pass
        front.insert(front.index("fuse_attention") + 1, attention_pass(options["attention"]))
    return front + low + BACK[:1] + formats + BACK[1:]
