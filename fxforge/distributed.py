"""Tensor-parallel runs across processes: the artifacts each rank writes and loads, and what
``generate`` must agree on across ranks.

``aot_compile(..., tensor_parallel=True)`` under torchrun writes one artifact per rank,
``<out>/rank<r>/`` (its manifest names the world size, the rank and the bytes of weights it
holds), and rank 0 writes ``<out>/tensor_parallel.json`` naming the world size. ``fxforge.load
(<out>)`` on every rank then reads only its own folder: a rank's memory holds its shard, never
the whole model. Loading checks the process group (world size and rank), that the weights fit
in this host's memory per rank before reading them, and points the stored collectives at this
process's group.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from fxforge.errors import ArtifactError, TensorParallelError

SET_INDEX = "tensor_parallel.json"


def rank_folder(out_dir: Path, options: Any) -> Path:
    """Where this rank's artifact goes (``out_dir`` itself without tensor parallelism)."""
    if not options.tensor_parallel:
        return out_dir
    from fxforge.passes.tensor_parallel import current_mesh
    return out_dir / f"rank{current_mesh(options.tensor_parallel).rank}"


def manifest_entry(options: Any, weight_bytes: int) -> Optional[dict]:
    """The manifest's ``tensor_parallel`` entry for this rank's artifact, or None."""
    if not options.tensor_parallel:
        return None
    from fxforge.passes.tensor_parallel import current_mesh
    mesh = current_mesh(options.tensor_parallel)
    return {"world_size": mesh.world, "rank": mesh.rank, "weight_bytes": weight_bytes}


def finish_set(out_dir: Path, options: Any) -> None:
    """Rank 0 names the set once every rank's artifact is written and checked."""
    if not options.tensor_parallel:
        return
    import torch.distributed as dist
    dist.barrier()
    if dist.get_rank() == 0:
        (out_dir / SET_INDEX).write_text(json.dumps({"world_size": dist.get_world_size()}))


def this_ranks_folder(root: Path) -> Path:
    """``root`` itself, or, for a tensor-parallel set, this rank's folder in it."""
    index = root / SET_INDEX
    if not index.is_file() or (root / "manifest.json").exists():
        return root
    from fxforge.passes.tensor_parallel import current_mesh
    try:
        world = json.loads(index.read_text())["world_size"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ArtifactError(f"artifact set {root}: {SET_INDEX} is unreadable ({exc})") from None
    if type(world) is not int or world < 1:
        raise ArtifactError(f"artifact set {root}: {SET_INDEX} names world size {world!r}")
    return root / f"rank{current_mesh(world).rank}"


def check_rank(root: Path, manifest: dict) -> Optional[str]:
    """For a tensor-parallel artifact: check this process is its rank and its weights fit;
    returns the process group to bind its collectives to (None: not tensor-parallel)."""
    entry = manifest.get("tensor_parallel")
    if entry is None:
        return None
    if not isinstance(entry, dict) or not all(type(entry.get(k)) is int
                                              for k in ("world_size", "rank", "weight_bytes")):
        raise ArtifactError(f"artifact {root}: manifest.json: bad tensor_parallel entry")
    from fxforge.passes.tensor_parallel import check_fits, current_mesh
    mesh = current_mesh(entry["world_size"])
    if mesh.rank != entry["rank"]:
        raise TensorParallelError(f"artifact {root} holds rank {entry['rank']}'s shard, and this "
                                  f"process is rank {mesh.rank}: load the set's folder (its "
                                  f"parent), which picks each rank's own")
    check_fits(entry["weight_bytes"], mesh)
    return mesh.group


def is_tensor_parallel(model: Any) -> bool:
    """``model`` is a compiled module or an artifact compiled tensor-parallel."""
    return bool(getattr(getattr(model, "options", None), "tensor_parallel", False))


def shared_seed(seed: Optional[int], model: Any) -> Optional[int]:
    """The sampling seed for ``model``: ``seed`` when given or when ``model`` is not compiled
    tensor-parallel; else rank 0's random one, which every rank then uses (ranks drawing their
    own would pick different tokens, and the next step's collectives would mix sequences)."""
    if seed is not None or not is_tensor_parallel(model):
        return seed
    import torch
    import torch.distributed as dist
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    dist.broadcast(drawn, src=0)
    return int(drawn.item())
