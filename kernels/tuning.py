"""What a kernel exposes to the autotuner: its tuning space, a default, and a pruning rule.

Every kernel family (``kernels/<op>.py``) publishes a :class:`TuningSpace`. A :class:`Config`
is a set of named integer parameters (block sizes, ``GROUP_M``, thread counts, ...) plus the
Triton launch knobs ``num_warps``/``num_stages`` (ignored by CPU kernels). ``prune`` returns
the reason a config cannot run for a given problem (shared-memory or register limits, a block
larger than the problem), or ``None``: the autotuner measures only what survives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional


@dataclass(frozen=True)
class Config:
    params: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def of(num_warps: int = 4, num_stages: int = 2, **params: int) -> "Config":
        return Config(tuple(sorted(params.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.params)[name]

    def kwargs(self) -> dict[str, int]:
        return dict(self.params)

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{inner}, warps={self.num_warps}, stages={self.num_stages}"


Problem = Mapping[str, Any]  # e.g. {"M": 128, "N": 768, "K": 256, "dtype": torch.bfloat16}


@dataclass(frozen=True)
class TuningSpace:
    kernel: str
    configs: tuple[Config, ...]
    default: Config
    prune: Callable[[Config, Problem], Optional[str]] = field(default=lambda config, problem: None)

    def survivors(self, problem: Problem) -> tuple[list[Config], dict[Config, str]]:
        """The configs worth measuring for ``problem``, and the pruned ones with the reason."""
        kept, pruned = [], {}
        for config in self.configs:
            reason = self.prune(config, problem)
            if reason is None:
                kept.append(config)
            else:
                pruned[config] = reason
        return kept, pruned
