"""``python -m fxforge tune MODULE:FACTORY --example SPEC``: a kernel autotuning run.

1. **collect**: compile the model once with a ``collect`` session: every kernel that has a
   tuning space reports its task; the ones already in the cache need nothing;
2. **tune** the missing ones here, on every local GPU, or on a Ray cluster (``--where``), with
   a progress bar; results go into the persistent cache (``FXFORGE_CACHE_DIR``);
3. **compare**: compile with default configs and with the tuned cache, time both (interleaved
   medians) and print one table row per kernel: config, gain over its default, candidates
   measured and pruned, time spent;
4. **batch sizes** (``--batch-sizes`` / ``--budget-ms`` / ``--budget-mb``): throughput curve of
   the tuned model over the first dimension of every input;
5. **plots**: the measured configurations (the finalists at the times the choice and the gain
   were computed from) and the batch-size curve as PNG (``--plots DIR``; needs matplotlib,
   checked before anything is tuned).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fxforge.autotune.cache import TuningCache
from fxforge.autotune.measure import measure_interleaved
from fxforge.autotune.session import Pick, session
from fxforge.errors import OptionsError


def _compiled(model: torch.nn.Module, options: dict, autotune: str) -> Callable:
    return torch.compile(model, backend="fxforge", options={**options, "autotune": autotune})


def _first_run(fn: Callable, examples: tuple) -> list:
    """Run ``fn`` once (this compiles it) and return the CompiledGraphs it built."""
    from fxforge.compiler import recording
    with recording() as graphs, torch.no_grad():
        fn(*examples)
    return graphs


def _distinct_picks(graphs: list) -> list[Pick]:
    seen: dict[int, Pick] = {}
    for graph in graphs:
        for pick in graph.tuning:
            seen.setdefault(id(pick), pick)
    return list(seen.values())


def collect_tasks(model, examples, options, cache: TuningCache) -> tuple[list, int]:
    torch._dynamo.reset()
    with session("collect", cache=cache) as collecting:
        _first_run(_compiled(model, options, "cache"), examples)
    return list(collecting.missing), collecting.stats()["cache"]


def tune_missing(tasks: list, args: argparse.Namespace, cache: TuningCache) -> list:
    from tqdm import tqdm
    from fxforge.autotune.distributed import tune_tasks
    if not tasks:
        return []
    with tqdm(total=len(tasks), desc="tuning kernels", unit="kernel") as bar:
        def advance(outcome) -> None:
            bar.set_postfix_str(outcome.task.label()[:48])
            bar.update()
        return tune_tasks(tasks, where=args.where, strategy=args.strategy,
                          max_fraction=args.max_fraction, cache=cache, progress=advance)


def compare(model, examples, options, rounds: int) -> tuple[list[Pick], dict]:
    """Compile with default and with tuned configs; both timed interleaved, medians."""
    torch._dynamo.reset()
    default = _compiled(model, options, "off")
    _first_run(default, examples)
    tuned = _compiled(model, options, "cache")
    picks = _distinct_picks(_first_run(tuned, examples))
    with torch.no_grad():
        timings = measure_interleaved({"default": lambda: default(*examples),
                                       "tuned": lambda: tuned(*examples)}, rounds=rounds)
    return picks, {name: t.median for name, t in timings.items()}


def kernel_table(picks: list[Pick]) -> str:
    header = ("kernel", "config", "default", "gain", "measured", "pruned", "tune s", "from")
    rows = []
    for pick in picks:
        r = pick.result
        rows.append((pick.task.label(), r.describe(pick.config) if r else pick.config.describe(),
                     r.describe(r.default) if r else "-", f"{r.gain:.2f}x" if r else "-",
                     f"{r.measured}/{r.total}" if r else "-", str(r.pruned) if r else "-",
                     f"{r.seconds:.1f}" if r else "-", pick.source))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def batch_inputs(specs: list, seed: int) -> Callable[[int], tuple]:
    """Inputs with the first dimension of every spec set to the batch size."""
    from fxforge.specs import DimSpec

    def make(batch: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        return tuple(dataclasses.replace(s, dims=(DimSpec(batch),) + s.dims[1:]).example(generator)
                     for s in specs)
    return make


def batch_search(model, specs, options, args) -> Any:
    from fxforge.autotune.batch import find_batch_size
    torch._dynamo.reset()
    tuned = _compiled(model, options, "tune")   # a new batch shape's kernels get tuned too
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    return find_batch_size(tuned, batch_inputs(specs, args.seed), batch_sizes=sizes,
                           budget_ms=args.budget_ms, budget_mb=args.budget_mb,
                           max_batch=args.max_batch)


def cmd_tune(args: argparse.Namespace) -> int:
    from fxforge.__main__ import _model_and_examples

    if args.plots:
        _require_plotting()
    start = time.perf_counter()
    model, specs, examples, options = _model_and_examples(args)
    options.pop("autotune", None)
    cache = TuningCache()
    tasks, already = collect_tasks(model, examples, options, cache)
    print(f"{len(tasks)} kernel(s) to tune, {already} already in the tuning cache ({cache.root})")
    outcomes = tune_missing(tasks, args, cache)
    failed = [o for o in outcomes if o.result is None]
    for outcome in failed:
        print(f"  could not tune {outcome.task.label()}: {outcome.error}")
    picks, model_times = compare(model, examples, options, args.rounds)
    print(kernel_table(picks))
    print(f"model forward: default configs {model_times['default'] * 1e3:.3f} ms, tuned "
          f"{model_times['tuned'] * 1e3:.3f} ms ({model_times['default'] / model_times['tuned']:.2f}x)")
    curve = None
    if args.batch_sizes or args.budget_ms or args.budget_mb:
        curve = batch_search(model, specs, options, args)
        print(curve.table())
    if args.plots:
        _plots(Path(args.plots), picks, curve)
    if args.export:
        count = cache.export(args.export, [p.key for p in picks if p.key is not None])
        print(f"exported {count} tuning entries to {args.export}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def _require_plotting() -> None:
    """Refuse ``--plots`` before tuning, not after it, when matplotlib is missing."""
    from fxforge.autotune.plots import require_matplotlib
    try:
        require_matplotlib()
    except ImportError as exc:
        raise OptionsError(f"--plots: {exc}") from None


def _plots(folder: Path, picks: list[Pick], curve) -> None:
    from fxforge.autotune.plots import plot_batch_curve, plot_configs
    results = [p.result.to_json() for p in picks if p.result is not None]
    if results:
        print(f"wrote {plot_configs(results, folder / 'configs.png')}")
    if curve is not None:
        print(f"wrote {plot_batch_curve(curve, folder / 'batch_curve.png')}")


def add_parser(sub) -> None:
    from fxforge.__main__ import _model_arguments
    tune = sub.add_parser("tune", help="autotune a model's kernels into the persistent cache")
    _model_arguments(tune)
    tune.add_argument("--where", default="local",
                      help="local (this process), gpus (every local GPU in parallel), or a Ray "
                           "address: ray:local, ray:auto, ray://HOST:PORT")
    tune.add_argument("--strategy", choices=("guided", "exhaustive"), default="guided")
    tune.add_argument("--max-fraction", type=float, default=0.25,
                      help="guided search measures at most this fraction of a space")
    tune.add_argument("--batch-sizes", help="comma-separated batch sizes to measure")
    tune.add_argument("--budget-ms", type=float, help="latency budget per batch (ms)")
    tune.add_argument("--budget-mb", type=float, help="memory budget per batch (MB)")
    tune.add_argument("--max-batch", type=int, default=256)
    tune.add_argument("--rounds", type=int, default=7, help="timing rounds for the comparison")
    tune.add_argument("--plots", metavar="DIR", help="write configs.png and batch_curve.png here")
    tune.add_argument("--export", metavar="FILE", help="also write the entries used to a bundle")
    tune.set_defaults(run=cmd_tune)
