"""Tune many tasks at once: here, on every local GPU, or across a Ray cluster.

A tuning run compiles the model in a ``session("collect")``, whose ``missing`` holds the tasks no
cache entry answers; :func:`tune_tasks` tunes them somewhere and stores every result in the
driver's :class:`TuningCache`, so the next compile (mode ``cache`` or ``tune``) finds them.

``where``:

``"local"``    this process, one task after another (two CPU tunings at once would disturb each
               other's timings). A task that kills its process kills this one too.
``"gpus"``     one spawned worker process per GPU (``devices``, default every ``cuda:i``), pinned
               to it through ``CUDA_VISIBLE_DEVICES``; GPU tasks are dealt out as workers free up,
               CPU tasks are tuned here afterwards, one after another. ``devices=["cpu", "cpu"]``
               runs CPU workers instead: that exercises the machinery, but CPU tasks tuned
               concurrently share the cores and time each other's noise.
``"ray:..."``  one Ray task per tuning task. ``"ray:local"`` starts a local cluster (shut down at
               the end), ``"ray"``/``"ray:auto"`` joins the running one, ``"ray://host:port"``
               (Ray Client) or ``"ray:host:port"`` that one; an existing ``ray.init`` connection
               is used as it is and left open. A GPU task takes one GPU; a CPU task takes every
               CPU of its node, so CPU measurements never overlap on one machine.

A worker rebuilds the tunable (``make_tunable`` imports the family's module: it must be
importable there), searches it and sends back plain JSON -- the result and the cache key built
*where the measurement ran*, so the key's device identity is that GPU's or CPU's (GPUs of one
model share results). A task that fails (an exception, a worker process that dies, a lost node)
becomes a :class:`TaskOutcome` holding the error; the others go on.

Process pools use the ``spawn`` start method: a script that calls ``tune_tasks(where="gpus")``
at import time needs the usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import socket
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from fxforge.autotune.cache import RELEVANT_ENV, CacheKey, TuningCache
from fxforge.autotune.search import STRATEGIES, TuningResult, search
from fxforge.autotune.task import TuningTask, make_tunable

log = logging.getLogger("fxforge.autotune")

MAX_WORKER_DEATHS = 2       # a device whose worker dies this often in a row gets no more tasks
Reply = dict                # what a worker sends back: {"key", "result", "worker"} or {"error", "worker"}


@dataclass
class TaskOutcome:
    task: TuningTask
    result: Optional[TuningResult]
    error: str = ""         # why there is no result: first line a summary
    worker: str = ""        # where it ran: "host pid N (cuda:1)"

    @property
    def ok(self) -> bool:
        return self.result is not None


def tune_tasks(tasks: Iterable[TuningTask], *, where: str = "local", strategy: str = "guided",
               max_fraction: float = 0.25, cache: Optional[TuningCache] = None,
               devices: Optional[Sequence[str]] = None,
               progress: Optional[Callable[[TaskOutcome], None]] = None) -> list[TaskOutcome]:
    """Tune every distinct task of ``tasks`` (a list, or a session's ``missing`` dict) ``where``
    asked, store each result in ``cache`` (default: the user's) and return one outcome per
    distinct task, in order; ``progress`` is called with each outcome as it arrives."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if devices is not None and where != "gpus":
        raise ValueError(f"devices= applies to where='gpus' only (where={where!r})")
    if where not in ("local", "gpus", "ray") and not where.startswith("ray:"):
        raise ValueError(f"where must be 'local', 'gpus' or a Ray address ('ray:local', "
                         f"'ray:auto', 'ray://host:port'), got {where!r}")
    unique = list(dict.fromkeys(tasks))
    for task in unique:
        _kind(task.device)  # an unsupported device fails here, before any worker starts
    cache = cache if cache is not None else TuningCache()
    settings = (strategy, max_fraction)
    done: dict[TuningTask, TaskOutcome] = {}

    def record(task: TuningTask, reply: Reply) -> None:
        outcome = _outcome(task, reply, cache)
        done[task] = outcome
        if outcome.ok:
            log.info("fxforge autotune: %s -> %s (%.2fx over default) on %s", task.label(),
                     outcome.result.describe(outcome.result.best), outcome.result.gain,
                     outcome.worker)
        else:
            log.warning("fxforge autotune: %s failed on %s: %s", task.label(),
                        outcome.worker or "?", (outcome.error.splitlines() or [""])[0])
        if progress is not None:
            progress(outcome)

    device_list = _gpu_devices(devices) if where == "gpus" else []
    if unique and where == "local":
        for task in unique:
            record(task, tune_in_worker(task, *settings))
    elif unique and where == "gpus":
        _run_on_devices(unique, device_list, settings, record)
    elif unique:
        _run_on_ray(unique, where, settings, record)
    return [done[task] for task in unique]


# --- what every worker runs ----------------------------------------------------------------

_WORKER_DEVICE: Optional[str] = None   # set in pool workers: the device they are pinned to


def tune_in_worker(task: TuningTask, strategy: str, max_fraction: float,
                   device: Optional[str] = None, env: Optional[dict] = None) -> Reply:
    """Tune one task in this process and reply with plain JSON (never raises).

    ``device`` is the kind of device this worker was given ("cpu", or "cuda": the one GPU it
    sees); ``env`` the driver's key-relevant environment, adopted first (Ray workers)."""
    label = f"{socket.gethostname()} pid {os.getpid()}"
    if _WORKER_DEVICE or device:
        label += f" ({_WORKER_DEVICE or device})"
    try:
        if env is not None:
            _adopt_env(env)
        task = _on_device(task, device)
        tunable = make_tunable(task)
        result = search(tunable, strategy=strategy, max_fraction=max_fraction)
        key = CacheKey.make(tunable.space.kernel, task.source_hash, task.problem_dict,
                            device=task.device)
        return {"key": key.fields(), "result": result.to_json(), "worker": label}
    except Exception as exc:
        return {"error": _error_text(exc, with_trace=True), "worker": label}


def _on_device(task: TuningTask, device: Optional[str]) -> TuningTask:
    if device is None:
        return task
    if _kind(task.device) != device:
        raise ValueError(f"a {task.device} task cannot be tuned on a {device} worker")
    # a pinned worker sees its GPU as the only one; the key names the GPU model, not its index
    return dataclasses.replace(task, device="cuda") if device == "cuda" else task


def _adopt_env(env: dict) -> None:
    """Make this worker's key-relevant environment the driver's, and torch's thread count what
    it would be here under it: Ray sets ``OMP_NUM_THREADS`` to a task's CPU count when it is
    unset, which would key the result under a setting the driver never looks up."""
    import torch
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                          else _physical_cores())


def _physical_cores() -> int:
    """torch's default thread count when no variable sets one: the physical cores."""
    try:
        import psutil
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def _kind(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        return "cuda"
    raise ValueError(f"cannot tune a task on device {device!r} (want 'cpu' or 'cuda[:N]')")


def _error_text(exc: BaseException, with_trace: bool = False) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
    origin = exc.__cause__ or exc   # where it went wrong, not where it was re-raised
    if with_trace and origin.__traceback__ is not None:
        frames = traceback.extract_tb(origin.__traceback__)[-3:]
        text += "\n" + "".join(traceback.format_list(frames)).rstrip()
    return text


def _outcome(task: TuningTask, reply: Reply, cache: TuningCache) -> TaskOutcome:
    """The driver's side: rebuild the result, store it under the key the worker built."""
    worker = reply.get("worker", "")
    if "error" in reply:
        return TaskOutcome(task, None, reply["error"], worker)
    try:
        result = TuningResult.from_json(reply["result"])
        cache.put(CacheKey.from_fields(reply["key"]), reply["result"])
    except (KeyError, ValueError, TypeError) as exc:
        return TaskOutcome(task, None, f"unusable reply from the worker: {_error_text(exc)}",
                           worker)
    return TaskOutcome(task, result, "", worker)


# --- where="gpus": one spawned worker process per device ------------------------------------

def _gpu_devices(devices: Optional[Sequence[str]]) -> list[str]:
    import torch
    count = torch.cuda.device_count()
    if devices is None:
        if count == 0:
            raise RuntimeError("tune_tasks(where='gpus'): no CUDA device on this machine "
                               "(use where='local', or devices=['cpu', ...] for CPU workers)")
        return [f"cuda:{i}" for i in range(count)]
    chosen = ["cuda:0" if d == "cuda" else d for d in devices]
    if not chosen:
        raise ValueError("tune_tasks(where='gpus'): devices is empty")
    for device in chosen:
        if _kind(device) == "cuda" and not int(device.split(":")[1]) < count:
            raise RuntimeError(f"tune_tasks(where='gpus'): no CUDA device {device} "
                               f"({count} visible)")
    return chosen


def _pin_worker(device: str, visible_id: Optional[str]) -> None:
    """Pool initializer: runs before the worker touches CUDA, which reads the variable once."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = device
    if visible_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_id


def _visible_id(device: str) -> Optional[str]:
    """What ``CUDA_VISIBLE_DEVICES`` must say for ``cuda:N`` of this process to be a worker's
    only GPU (N counts within this process's own visible list, if it has one)."""
    if _kind(device) != "cuda":
        return None
    index = int(device.split(":")[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def _new_executor(device: str) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_pin_worker, initargs=(device, _visible_id(device)))


def _run_on_devices(tasks: list[TuningTask], devices: list[str], settings: tuple,
                    record: Callable[[TuningTask, Reply], None]) -> None:
    """One task in flight per device, so a worker that dies names its culprit; the device gets
    a fresh worker, until it dies ``MAX_WORKER_DEATHS`` times in a row. A GPU worker is
    replaced after every task: a CUDA error (an illegal address) poisons the process's context
    for every later task, and the fresh process costs seconds next to minutes of tuning."""
    queues = {kind: deque(t for t in tasks if _kind(t.device) == kind) for kind in ("cpu", "cuda")}
    kinds = {_kind(d) for d in devices}
    for task in queues["cuda"] if "cuda" not in kinds else ():
        record(task, {"error": f"no CUDA worker among devices {devices} for this task"})
    here = list(queues["cpu"]) if "cpu" not in kinds else []
    for kind in ("cpu", "cuda"):
        if kind not in kinds:
            queues[kind].clear()
    executors = {i: _new_executor(d) for i, d in enumerate(devices)}
    deaths = dict.fromkeys(executors, 0)
    running: dict[Future, tuple[int, TuningTask]] = {}

    def feed(i: int) -> None:
        queue = queues[_kind(devices[i])]
        if queue and deaths[i] < MAX_WORKER_DEATHS:
            task = queue.popleft()
            future = executors[i].submit(tune_in_worker, task, *settings, _kind(devices[i]))
            running[future] = (i, task)

    try:
        for i in executors:
            feed(i)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i, task = running.pop(future)
                record(task, _pool_reply(future, devices[i]))
                died = isinstance(future.exception(), BrokenProcessPool)
                deaths[i] = deaths[i] + 1 if died else 0
                if died or _kind(devices[i]) == "cuda":
                    executors[i].shutdown(wait=False)
                    executors[i] = _new_executor(devices[i])
                feed(i)
    finally:
        for executor in executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
    for queue in queues.values():   # every worker of that kind kept dying
        for task in queue:
            record(task, {"error": "not tuned: every worker process for its device kind died"})
    for task in here:
        record(task, tune_in_worker(task, *settings))


def _pool_reply(future: Future, device: str) -> Reply:
    exc = future.exception()
    if exc is None:
        return future.result()
    if isinstance(exc, BrokenProcessPool):
        return {"error": f"the worker process for {device} died while tuning this task "
                         f"(crash, os._exit or killed: out of memory?)", "worker": device}
    return {"error": _error_text(exc), "worker": device}   # e.g. the task did not pickle


# --- where="ray...": one Ray task per tuning task -------------------------------------------

def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("tune_tasks(where='ray...') needs Ray: pip install ray") from exc
    return ray


def _connect(ray: Any, where: str) -> bool:
    """Connect to the cluster ``where`` names; True if this call started the connection."""
    if ray.is_initialized():
        log.info("fxforge autotune: using the existing Ray connection (where=%r not applied)",
                 where)
        return False
    if where.startswith("ray://"):
        address = where
    else:
        address = where.removeprefix("ray").removeprefix(":") or "auto"
    if address == "local":
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def _run_on_ray(tasks: list[TuningTask], where: str, settings: tuple,
                record: Callable[[TuningTask, Reply], None]) -> None:
    ray = _import_ray()
    started = _connect(ray, where)
    try:
        _ray_schedule(ray, tasks, settings, record)
    finally:
        if started:
            ray.shutdown()


def _ray_schedule(ray: Any, tasks: list[TuningTask], settings: tuple,
                  record: Callable[[TuningTask, Reply], None]) -> None:
    """GPU tasks all at once (one GPU each); CPU tasks one per node at a time, pinned to the
    node and holding all of its CPUs. No retries: a task that kills its worker would again."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    remote = ray.remote(max_retries=0)(tune_in_worker)
    env = {name: os.environ.get(name) for name in RELEVANT_ENV}
    pending: dict[Any, tuple[TuningTask, Optional[str]]] = {}
    gpu_tasks = [t for t in tasks if _kind(t.device) == "cuda"]
    cpu_tasks = deque(t for t in tasks if _kind(t.device) == "cpu")
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    for task in gpu_tasks:
        if has_gpu:
            pending[remote.options(num_gpus=1).remote(task, *settings, "cuda", env)] = (task, None)
        else:
            record(task, {"error": "the Ray cluster has no GPU", "worker": "ray"})
    nodes = _cpu_nodes(ray)

    def feed(node: str) -> None:
        if cpu_tasks:
            task = cpu_tasks.popleft()
            options = remote.options(num_cpus=nodes[node], scheduling_strategy=
                                     NodeAffinitySchedulingStrategy(node, soft=False))
            pending[options.remote(task, *settings, "cpu", env)] = (task, node)

    for node in list(nodes):
        feed(node)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        task, node = pending.pop(ref)
        try:
            reply = ray.get(ref)
        except Exception as exc:   # the worker or its node died, the task was unschedulable
            reply = {"error": _error_text(exc), "worker": f"ray node {node[:12]}" if node else "ray"}
            if node is not None and node not in _cpu_nodes(ray):
                del nodes[node]
                node = None
        record(task, reply)
        if node is not None:
            feed(node)
    for task in cpu_tasks:
        record(task, {"error": "no live Ray node with CPUs to tune this task", "worker": "ray"})


def _cpu_nodes(ray: Any) -> dict[str, float]:
    return {n["NodeID"]: n["Resources"]["CPU"] for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1}
