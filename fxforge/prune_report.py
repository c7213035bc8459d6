"""The pruning report's per-layer part: what ``prune`` removed (``ir.info["prune"]``, written by
``passes/prune.py``), one row per removed block, per attention layer that lost heads and per pruned MLP, with the bytes of weights and
the FLOPs per token saved (2 per weight: one multiply, one add). ``bench/prune.py`` adds
the measured speed and perplexity of each variant."""
from __future__ import annotations

from typing import Any, Mapping

COLUMNS = ("kind", "layer", "removed", "MB_saved", "MFLOP_per_token_saved", "detail")


def report_rows(info: Mapping[str, Any]) -> list[dict]:
    """Rows for the blocks, the attention layers, then the MLPs, of one pruned graph's
    ``info["prune"]``."""
    rows = []
    for block in info.get("layers", []):
        influence = block.get("influence")
        rows.append({"kind": "layer", "layer": block["name"] or f"block {block['index']}",
                     "removed": "whole block", "MB_saved": block["bytes_saved"] / 1e6,
                     "MFLOP_per_token_saved": 2 * block["weights_saved"] / 1e6,
                     "detail": "influence " + (f"{influence:.4f}" if influence is not None
                                               else "not measured (named)")})
    for attention in info.get("heads", []):
        rows.append({"kind": "heads", "layer": attention["name"],
                     "removed": f"{attention['kv_heads'] - attention['kv_heads_after']}/"
                                f"{attention['kv_heads']} kv groups "
                                f"({attention['heads'] - attention['heads_after']} query heads)",
                     "MB_saved": attention["bytes_saved"] / 1e6,
                     "MFLOP_per_token_saved": 2 * attention["weights_saved"] / 1e6,
                     "detail": "kept groups " + ",".join(map(str, attention["kept_groups"]))
                     + (" (measured)" if attention["measured"] else " (magnitude)")})
    for mlp in info.get("mlp", []):
        gain = mlp.get("compensation_gain")
        rows.append({"kind": "mlp", "layer": mlp["name"].rsplit(".", 2)[0],
                     "removed": f"{mlp['width'] - mlp['kept']}/{mlp['width']} channels",
                     "MB_saved": mlp["bytes_saved"] / 1e6,
                     "MFLOP_per_token_saved": 2 * mlp["weights_saved"] / 1e6,
                     "detail": ("compensated" if mlp["compensated"] else "not compensated")
                     + (f" (held-out error x{gain:.3f})" if gain is not None else "")})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                                       for c in COLUMNS) + " |")
    return "\n".join(lines)
