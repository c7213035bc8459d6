"""The pass pipeline built from compile options: an explicit, named list."""
from __future__ import annotations

from typing import Any, Mapping

# Order matters: no-op removal and CSE expose shared projection inputs; horizontal fusion
# leaves weight concatenations for constant folding; DCE sweeps last.
CLEANUP = ["remove_noops", "cse", "fuse_projections", "constant_fold", "cse", "remove_noops", "dce"]


def default_pipeline(options: Mapping[str, Any]) -> list[str]:
    """The pass names to run for ``options`` (``options["passes"]`` overrides it whole)."""
    if options.get("passes") is not None:
        return list(options["passes"])
    return list(CLEANUP)
