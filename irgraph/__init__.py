"""fxforge's IR: functional ATen-level torch.fx graphs with typed tensor metadata."""
from fxforge.irgraph.capture import (KEPT_OPS, CaptureError, build_ir, capture_aot_inference,
                                     capture_export, decomposition_table, dynamo_weight_indices)
from fxforge.irgraph.graph import IRGraph, node_arguments, op_name, schema_arguments
from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta, infer_node, meta_of, set_meta, tensor_meta
from fxforge.irgraph import ops, window_ops  # noqa: F401  (register torch.ops.fxforge.*)
from fxforge.irgraph.fusion import FUSIBLE, GROUP_KEY, POINTWISE, ROW_REDUCTIONS, group_of, groups
from fxforge.irgraph.nxview import to_networkx, would_create_cycle
from fxforge.irgraph.printer import format_ir
from fxforge.irgraph.serialize import SerializationError, ir_from_json, ir_to_json
from fxforge.irgraph.verify import IRVerificationError, verify

__all__ = [
    "FUSIBLE", "GROUP_KEY", "KEPT_OPS", "POINTWISE", "ROW_REDUCTIONS", "CaptureError", "group_of", "groups", "IRGraph", "IRVerificationError", "META_KEY", "SerializationError",
    "SymMeta", "TensorMeta", "build_ir", "capture_aot_inference", "capture_export",
    "decomposition_table", "dynamo_weight_indices", "format_ir", "infer_node", "ir_from_json",
    "ir_to_json", "meta_of", "node_arguments", "op_name", "schema_arguments", "set_meta", "tensor_meta", "to_networkx", "verify",
    "would_create_cycle",
]
