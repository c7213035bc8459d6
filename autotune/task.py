"""What the autotuner tunes: a :class:`TuningTask` names a kernel family and a problem; the
family's factory (registered by the kernel's own module) turns it into a :class:`Tunable`.

The task, the tunable and the family registry are the tuning contract of
``kernels/tuning.py`` (re-exported here); this module rebuilds a tunable from a task: the
worker imports ``task.module``, which registers the family, and calls its factory. The tunable
then builds one runnable per config, a reference output to check each candidate against, and a
cost estimate that ranks candidates before anything is measured.
"""
from __future__ import annotations

import importlib

from fxforge.kernels.tuning import (FAMILIES, TOLERANCE, Tunable, TuningTask,  # noqa: F401
                                    bucket, compare_outputs, register_family)


def make_tunable(task: TuningTask) -> Tunable:
    if task.family not in FAMILIES:
        importlib.import_module(task.module)
    if task.family not in FAMILIES:
        raise KeyError(f"module {task.module} does not register tuning family {task.family!r}")
    return FAMILIES[task.family](task)
