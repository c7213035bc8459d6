"""``backend="auto"``: the backend for a graph, from where its tensors live."""
from __future__ import annotations

import importlib.util
from typing import Optional

from fxforge.backends.base import _BACKENDS, Backend, get_backend
from fxforge.irgraph import IRGraph, META_KEY, TensorMeta


def graph_devices(ir: IRGraph) -> set[str]:
    devices = set()
    for node in ir.gm.graph.nodes:
        meta = node.meta.get(META_KEY)
        if node.op in ("placeholder", "get_attr") and isinstance(meta, TensorMeta):
            devices.add(meta.device.type)
    return devices


def backend_unavailable(name: str) -> Optional[str]:
    """What backend ``name`` lacks in this process (a device, a package), or None if it can run:
    said by its class's static ``unavailable()``, so that the options fail before compiling."""
    check = getattr(_BACKENDS.get(name), "unavailable", None)
    return check() if check is not None else None


def resolve_backend(name: str, ir: IRGraph) -> Backend:
    """``"auto"``: Triton for graphs on a GPU (when Triton is installed), else the CPU backend."""
    if name != "auto":
        return get_backend(name)
    if "cuda" in graph_devices(ir) and importlib.util.find_spec("triton") is not None:
        return get_backend("triton")
    return get_backend("cpu")
