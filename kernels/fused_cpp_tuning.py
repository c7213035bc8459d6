"""Tuning space of the generated C++ row kernels (``fused_cpp``): threads x rows per OpenMP
chunk x the vector loops' ``simdlen``.

The default is what runs without tuning: one thread below ``PARALLEL_MIN_WORK`` (a fork/join
costs more than it saves on a small group), all of torch's threads above it, an even static
split of the rows and the compiler's own vector length. A tuned kernel is tuned for the group's
example shape (rows bucketed to a power of two); a dynamic shape keeps the tuned knobs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from fxforge.kernels.row_program import RowProgram
from fxforge.kernels.fused_inputs import example_shapes, random_inputs, rows_and_cols
from fxforge.kernels.fused_cpp import (PARALLEL_MIN_WORK, compile_program_cpu, generate_source,
                                       work_per_element)
from fxforge.kernels.linear_cpu import thread_counts
from fxforge.kernels.toolchain import source_hash
from fxforge.kernels.tuning import (Config, Problem, Tunable, TuningSpace, TuningTask, bucket, choose,
                                    current, register_family)

CHUNKS = (0, 1, 2, 4, 8, 16, 32)      # 0: rows split evenly between the threads
SIMDLENS = (0, 8, 16, 32)             # 0: the compiler's choice (8 floats with AVX2)
NS_PER_WORK = 0.25e-9                 # one cheap op on one element, one core (cost model only)
FORK_JOIN_S = 4e-6                    # an OpenMP parallel region's fixed cost here


def _prune(config: Config, problem: Problem) -> Optional[str]:
    threads, chunk, simdlen = config["threads"], config["chunk"], config["simdlen"]
    if threads > torch.get_num_threads():
        return f"more threads than torch's {torch.get_num_threads()}"
    if threads > 1 and chunk * threads > problem["rows"]:
        return f"{threads} chunks of {chunk} rows exceed the {problem['rows']} rows: threads idle"
    if simdlen > max(8, problem["N"]):
        return f"simdlen {simdlen} is longer than the row ({problem['N']})"
    return None


def default_threads(rows: int, ncols: int, work: int) -> int:
    return torch.get_num_threads() if rows * ncols * work >= PARALLEL_MIN_WORK else 1


def fused_cpp_space(rows: int, ncols: int, work: int) -> TuningSpace:
    configs = tuple(Config.of(threads=t, chunk=c, simdlen=s) for t in thread_counts()
                    for c in (CHUNKS if t > 1 else (0,)) for s in SIMDLENS)
    default = Config.of(threads=default_threads(rows, ncols, work), chunk=0, simdlen=0)
    return TuningSpace("fused_cpp", configs, default=default, prune=_prune,
                       describe=lambda c: f"{c['threads']} thr, chunk {c['chunk']}, simdlen {c['simdlen']}")


def fused_task(program: RowProgram, shapes: list[tuple]) -> TuningTask:
    rows, ncols = rows_and_cols(program, shapes)
    source = generate_source(program, f"fused_{program.digest()}")
    problem = {"rows": bucket(rows), "N": ncols, "work": work_per_element(program)}
    return TuningTask.make("fused_cpp", __name__, problem, source_hash(source),
                           payload=(program, shapes))


class FusedCppTunable(Tunable):
    def __init__(self, task: TuningTask):
        super().__init__(task)
        self.program, shapes = task.payload
        rows, ncols = rows_and_cols(self.program, shapes)
        self.space = fused_cpp_space(rows, ncols, self.problem["work"])
        self.inputs = random_inputs(shapes)
        self.rows, self.ncols = rows, ncols

    def build(self, config: Config):
        kernel = compile_program_cpu(self.program, config["threads"], config["chunk"],
                                     config["simdlen"])
        inputs = self.inputs
        return lambda: kernel(*inputs)

    def cost(self, config: Config) -> float:
        """Rows of the busiest thread x the work per row, plus the fork/join of a parallel
        region; ``simdlen`` is left to measurement (ties rank the compiler's choice first)."""
        threads, chunk = config["threads"], config["chunk"]
        per_row = self.ncols * self.problem["work"] * NS_PER_WORK
        if threads == 1:
            busiest = self.rows
        else:
            size = chunk or math.ceil(self.rows / threads)
            busiest = min(self.rows, math.ceil(math.ceil(self.rows / size) / threads) * size)
        return busiest * per_row + FORK_JOIN_S * (threads > 1) + 1e-9 * config["simdlen"]


register_family("fused_cpp", FusedCppTunable)


def tuned_knobs(program: RowProgram, gm: fx.GraphModule) -> dict:
    """Keyword knobs for ``compile_program_cpu``: empty (the dynamic default) unless a tuning
    session is open and picks something other than the default."""
    active = current()
    if active is None or active.mode == "off":
        return {}
    shapes = example_shapes(program, gm)
    if shapes is None:
        return {}
    task = fused_task(program, shapes)
    rows, ncols = rows_and_cols(program, shapes)
    space = fused_cpp_space(rows, ncols, task.problem_dict["work"])
    config = choose(space, lambda: task)
    if config == space.default:
        return {}
    return {"threads": config["threads"], "chunk": config["chunk"], "simdlen": config["simdlen"]}
