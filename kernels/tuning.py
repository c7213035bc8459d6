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

    def to_json(self) -> dict:
        return {"params": dict(self.params), "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @staticmethod
    def from_json(data: Any) -> "Config":
        """The inverse of ``to_json``; ValueError on anything that is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise ValueError(f"not a config: {data!r}")
        ints = [data.get("num_warps"), data.get("num_stages"), *data["params"].values()]
        if not all(type(v) is int for v in ints) or not all(isinstance(k, str) for k in data["params"]):
            raise ValueError(f"config values must be integers: {data!r}")
        return Config(tuple(sorted(data["params"].items())), data["num_warps"], data["num_stages"])


Problem = Mapping[str, Any]  # e.g. {"M": 128, "N": 768, "K": 256, "dtype": torch.bfloat16}


@dataclass(frozen=True)
class TuningSpace:
    kernel: str
    configs: tuple[Config, ...]
    default: Config
    prune: Callable[[Config, Problem], Optional[str]] = field(default=lambda config, problem: None)
    describe: Callable[[Config], str] = field(default=Config.describe)  # for reports and plots

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
