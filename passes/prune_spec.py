"""The ``prune`` option: what structured pruning removes, parsed once into a :class:`PruneSpec`.

Given as a dict (``{"mlp": 0.25, "layers": 2}``) or as the canonical string its ``str`` gives
(``"mlp:0.25,layers:2"``); the options keep the string. Fields:

* ``mlp``: the fraction of every MLP's hidden channels removed (gate/up rows and the matching
  down columns together), in [0, 0.9];
* ``heads``: the fraction of every attention layer's key/value groups removed, in [0, 0.9]: a
  group is one kv head with all its query heads (under MHA, one head), at least one stays
  (:mod:`fxforge.passes.prune_heads`);
* ``layers``: how many decoder blocks to remove, the least influential by their measured
  Block Influence; ``drop_layers``: which ones, by index (a list, or ``"3+5"`` in the string);
* ``score``: how MLP channels and kv groups are ranked: ``"wanda"`` (measured on the
  calibration activations, the default: |W|·‖x‖ per channel, a group's contribution to the
  output projection) or ``"magnitude"`` (|W| alone: the baseline reports compare against);
* ``compensate``: fold the removed channels' mean contribution into the down projection's bias
  (FLAP): ``"auto"`` (where it measures better on held-out calibration tokens), ``"on"``, ``"off"``;
* ``sparsity``: ``"2:4"`` semi-structured sparsity, GPU-only (refused on CPU backends).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

SCORES = ("wanda", "magnitude")
COMPENSATIONS = ("auto", "on", "off")
MAX_FRACTION = 0.9   # of an MLP's channels or a layer's kv groups
SEMI_STRUCTURED = "2:4"


class PruneSpecError(ValueError):
    """A ``prune`` option fxforge cannot read."""


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    mlp: float = 0.0
    heads: float = 0.0
    layers: int = 0
    drop_layers: tuple[int, ...] = ()
    score: str = "wanda"
    compensate: str = "auto"
    sparsity: Optional[str] = None

    @property
    def prunes_layers(self) -> bool:
        return bool(self.layers or self.drop_layers)

    @property
    def needs_calibration(self) -> bool:
        return self.layers > 0 or (self.mlp > 0 and (self.score == "wanda"
                                                      or self.compensate != "off")) \
            or (self.heads > 0 and self.score == "wanda")

    def __str__(self) -> str:
        fields = []
        if self.mlp:
            fields.append(f"mlp:{self.mlp:g}")
        if self.heads:
            fields.append(f"heads:{self.heads:g}")
        if self.layers:
            fields.append(f"layers:{self.layers}")
        if self.drop_layers:
            fields.append("drop_layers:" + "+".join(map(str, self.drop_layers)))
        if self.mlp or self.heads:
            fields.append(f"score:{self.score}")
        if self.mlp:
            fields.append(f"compensate:{self.compensate}")
        if self.sparsity:
            fields.append(f"sparsity:{self.sparsity}")
        return ",".join(fields)


def parse_prune(value: Any) -> PruneSpec:
    """A :class:`PruneSpec` from the option's dict or string form; errors name the field."""
    if isinstance(value, PruneSpec):
        return value
    fields = _fields(value)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(PruneSpec)})
    if unknown:
        raise PruneSpecError(f"option prune: unknown field(s) {unknown}; known: mlp, heads, "
                             "layers, "
                             "drop_layers, score, compensate, sparsity")
    spec = PruneSpec(mlp=_fraction("mlp", fields.get("mlp", 0.0)),
                     heads=_fraction("heads", fields.get("heads", 0.0)),
                     layers=_count("layers", fields.get("layers", 0)),
                     drop_layers=_indices(fields.get("drop_layers", ())),
                     score=_choice("score", fields.get("score", "wanda"), SCORES),
                     compensate=_choice("compensate", fields.get("compensate", "auto"), COMPENSATIONS),
                     sparsity=_sparsity(fields.get("sparsity")))
    if spec.layers and spec.drop_layers:
        raise PruneSpecError("option prune: give layers (a count, chosen by measured influence) "
                             "or drop_layers (which ones), not both")
    if not (spec.mlp or spec.heads or spec.prunes_layers or spec.sparsity):
        raise PruneSpecError(f"option prune={value!r} removes nothing: set mlp, heads, layers, "
                             "drop_layers or sparsity")
    return spec


def _fields(value: Any) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str) or not value.strip():
        raise PruneSpecError(f"option prune must be a dict like {{'mlp': 0.25, 'layers': 2}} or "
                             f"a string like 'mlp:0.25,layers:2', got {value!r}")
    fields: dict[str, str] = {}
    for part in value.split(","):
        found = re.fullmatch(r"\s*([a-z_]+)\s*:\s*([A-Za-z0-9_.:+-]+)\s*", part)
        if found is None or found.group(1) in fields:
            raise PruneSpecError(f"option prune={value!r}: cannot read {part.strip()!r} "
                                 "(name:value fields, each once)")
        fields[found.group(1)] = found.group(2)
    return fields


def _fraction(name: str, value: Any) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = None
    if fraction is None or isinstance(value, bool) or not 0.0 <= fraction <= MAX_FRACTION:
        raise PruneSpecError(f"option prune: {name} must be a fraction in [0, {MAX_FRACTION}], "
                             f"got {value!r}")
    return fraction


def _count(name: str, value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"\d+", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PruneSpecError(f"option prune: {name} must be a non-negative int, got {value!r}")
    return value


def _indices(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [int(v) if re.fullmatch(r"\d+", v) else v for v in value.split("+") if v]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise PruneSpecError(f"option prune: drop_layers must be a list of block indices "
                             f"(ints >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise PruneSpecError(f"option prune: drop_layers names a block twice: {value!r}")
    return tuple(sorted(value))


def _choice(name: str, value: Any, allowed: tuple) -> str:
    if value not in allowed:
        raise PruneSpecError(f"option prune: {name} must be one of {allowed}, got {value!r}")
    return value


def _sparsity(value: Any) -> Optional[str]:
    if value is None:
        return None
    if value != SEMI_STRUCTURED:
        raise PruneSpecError(f"option prune: sparsity must be {SEMI_STRUCTURED!r} (2:4 "
                             f"semi-structured), got {value!r}")
    return value
