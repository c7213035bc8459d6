"""Tuning many tasks: in this process, on a pool of worker processes, on a local Ray cluster.

Real CPU tasks (a linear layer, a generated C++ LayerNorm kernel) plus test families that fail
on purpose, written to a helper module that spawned workers and Ray workers import by name.
"""
from __future__ import annotations

import importlib.util
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.autotune.cache import TuningCache
from fxforge.autotune.distributed import TaskOutcome, _adopt_env, _physical_cores, tune_tasks
from fxforge.autotune.session import choose, session
from fxforge.autotune.task import TuningTask, make_tunable
from fxforge.irgraph import decomposition_table
from fxforge.kernels.fused import build_program
from fxforge.kernels.fused_cpp_tuning import example_shapes, fused_task
from fxforge.kernels.linear_cpu_tuning import linear_task

HELPER = "fxforge_test_failing_families"
HELPER_SOURCE = '''
import os
from fxforge.autotune.task import Tunable, register_family
from fxforge.kernels.tuning import Config, TuningSpace

CONFIGS = tuple(Config.of(variant=v) for v in range(3))

class Raises(Tunable):
    def __init__(self, task):
        super().__init__(task)
        self.space = TuningSpace("test_raises", CONFIGS, default=CONFIGS[0])
    def build(self, config):
        raise RuntimeError("this family cannot build anything")

class KillsWorker(Tunable):
    def __init__(self, task):
        super().__init__(task)
        self.space = TuningSpace("test_kills", CONFIGS, default=CONFIGS[0])
    def build(self, config):
        os._exit(3)

class CudaScale(Tunable):
    """A GPU family: three ways to double a tensor."""
    def __init__(self, task):
        import torch
        super().__init__(task)
        self.device = task.device
        self.space = TuningSpace("test_cuda_scale", CONFIGS, default=CONFIGS[0])
        self.x = torch.randn(256, 256, device=task.device)
    def build(self, config):
        x = self.x
        return [lambda: x * 2, lambda: x + x, lambda: x.mul(2)][config["variant"]]

register_family("test_raises", Raises)
register_family("test_kills", KillsWorker)
register_family("test_cuda_scale", CudaScale)
'''


@pytest.fixture(scope="module")
def helper_dir(tmp_path_factory):
    """The failing families' module, importable here, in spawned workers (they inherit sys.path)
    and in Ray workers (PYTHONPATH); compiled kernels go to a tmp cache shared by the tests."""
    folder = tmp_path_factory.mktemp("families")
    (folder / f"{HELPER}.py").write_text(textwrap.dedent(HELPER_SOURCE))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder),
                                                              os.environ.get("PYTHONPATH")])))
        mp.setenv("FXFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("fxforge_cache")))
        yield folder


@pytest.fixture(scope="module")
def real_tasks(helper_dir) -> list[TuningTask]:
    def residual_layer_norm(x, r, w, b):
        return F.layer_norm(x + r, (32,), w, b, 1e-5)
    inputs = (torch.randn(8, 32), torch.randn(8, 32), torch.randn(32), torch.randn(32))
    gm = make_fx(residual_layer_norm, decomposition_table=decomposition_table(),
                 tracing_mode="symbolic")(*inputs)
    program = build_program(gm)
    return [linear_task(8, 32, 48, torch.float32, "gelu", True, False),
            fused_task(program, example_shapes(program, gm))]


def failing(family: str) -> TuningTask:
    return TuningTask.make(family, HELPER, {"n": 1}, "test-source")


def assert_tuned_and_cached(outcomes: list[TaskOutcome], tasks: list[TuningTask],
                            cache: TuningCache) -> None:
    """Every task has a result, stored so that a cache-only session picks it up."""
    assert [o.task for o in outcomes] == tasks
    for outcome in outcomes:
        assert outcome.ok and outcome.error == "", outcome.error
        assert outcome.result.measured >= 1 and outcome.result.best_time > 0
    assert len(cache.entries()) == len(tasks)
    with session("cache", cache=cache) as active:
        for outcome in outcomes:
            config = choose(make_tunable(outcome.task).space, lambda: outcome.task)
            assert config == outcome.result.best
        assert active.stats()["cache"] == len(tasks)


def test_local_tunes_in_order_stores_results_and_isolates_failures(real_tasks, tmp_path):
    cache = TuningCache(tmp_path / "tuning")
    missing_module = TuningTask.make("no_such_family", "fxforge_no_such_module", {"n": 1}, "x")
    tasks = [real_tasks[0], failing("test_raises"), real_tasks[1], missing_module]
    seen: list[TaskOutcome] = []
    outcomes = tune_tasks(tasks + [real_tasks[0]], where="local", cache=cache,
                          progress=seen.append)
    assert [o.task for o in outcomes] == tasks          # duplicates are tuned once
    assert seen == outcomes
    assert f"pid {os.getpid()}" in outcomes[0].worker
    raised, missing = outcomes[1], outcomes[3]
    assert raised.result is None and "the default config fails" in raised.error
    assert "this family cannot build anything" in raised.error
    assert missing.result is None and "ModuleNotFoundError" in missing.error
    assert_tuned_and_cached([outcomes[0], outcomes[2]], real_tasks, cache)


def test_process_pool_spreads_tasks_and_survives_a_dying_worker(real_tasks, tmp_path):
    cache = TuningCache(tmp_path / "tuning")
    tasks = real_tasks + [failing("test_kills"), failing("test_raises")]
    outcomes = tune_tasks(tasks, where="gpus", devices=["cpu", "cpu"], cache=cache)
    assert [o.task for o in outcomes] == tasks
    tuned, killed, raised = outcomes[:2], outcomes[2], outcomes[3]
    assert_tuned_and_cached(tuned, real_tasks, cache)
    # the two first tasks start at once, one on each worker process (neither is this one)
    assert tuned[0].worker != tuned[1].worker
    assert all(f"pid {os.getpid()}" not in o.worker for o in tuned)
    assert killed.result is None and "died" in killed.error
    assert raised.result is None and "this family cannot build anything" in raised.error


def test_a_device_whose_worker_keeps_dying_is_retired(helper_dir, tmp_path):
    kills = [TuningTask.make("test_kills", HELPER, {"n": n}, "s") for n in (1, 2)]
    tasks = kills + [failing("test_raises")]
    outcomes = tune_tasks(tasks, where="gpus", devices=["cpu"], cache=TuningCache(tmp_path))
    assert ["died" in o.error for o in outcomes[:2]] == [True, True]
    assert "not tuned: every worker process" in outcomes[2].error   # never sent to a 3rd one


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_gpus_without_cuda_is_a_clear_error(real_tasks):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        tune_tasks(real_tasks, where="gpus")


def test_bad_arguments_fail_before_any_work(real_tasks, tmp_path):
    cache = TuningCache(tmp_path / "tuning")
    with pytest.raises(ValueError, match="where must be"):
        tune_tasks(real_tasks, where="cluster", cache=cache)
    with pytest.raises(ValueError, match="strategy"):
        tune_tasks(real_tasks, strategy="random", cache=cache)
    with pytest.raises(ValueError, match="devices= applies to where='gpus'"):
        tune_tasks(real_tasks, devices=["cpu"], cache=cache)
    odd = TuningTask.make("linear_cpu", "fxforge.kernels.linear_cpu", {"M": 8}, "x", device="mps")
    with pytest.raises(ValueError, match="'mps'"):
        tune_tasks([odd], cache=cache)
    assert cache.entries() == []


def test_ray_worker_adopts_the_drivers_thread_setting(monkeypatch):
    """Ray sets OMP_NUM_THREADS for its workers; the key must carry the driver's setting."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        _adopt_env({"OMP_NUM_THREADS": "3"})
        assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 3
        _adopt_env({"OMP_NUM_THREADS": None})      # the driver leaves it to torch's default
        assert "OMP_NUM_THREADS" not in os.environ
        assert torch.get_num_threads() == _physical_cores()
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_workers_are_pinned_and_keyed_by_gpu_model(helper_dir, tmp_path):
    cache = TuningCache(tmp_path / "tuning")
    count = torch.cuda.device_count()
    tasks = [TuningTask.make("test_cuda_scale", HELPER, {"n": n}, "s", device=f"cuda:{n % count}")
             for n in range(2 * count)]
    outcomes = tune_tasks(tasks, where="gpus", cache=cache)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert {o.worker.rsplit("(", 1)[1] for o in outcomes} <= {f"cuda:{i})" for i in range(count)}
    assert all(fields["device"].startswith("cuda|") for fields, _ in cache.entries())
    with session("cache", cache=cache) as active:   # the driver's own keys find them
        for outcome in outcomes:
            choose(make_tunable(outcome.task).space, lambda: outcome.task)
        assert active.stats()["cache"] == len(tasks)


@pytest.fixture
def ray_module():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    import ray
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def test_ray_local_cluster_tunes_and_shuts_down_only_what_it_started(ray_module, real_tasks,
                                                                      helper_dir, tmp_path):
    ray = ray_module
    assert not ray.is_initialized()
    cache = TuningCache(tmp_path / "tuning")
    tasks = real_tasks + [failing("test_raises"), failing("test_kills")]
    outcomes = tune_tasks(tasks, where="ray:local", cache=cache)
    assert not ray.is_initialized()                     # it started the cluster: it stops it
    assert [o.task for o in outcomes] == tasks
    assert_tuned_and_cached(outcomes[:2], real_tasks, cache)
    assert all(f"pid {os.getpid()}" not in o.worker for o in outcomes[:2])
    assert "this family cannot build anything" in outcomes[2].error
    assert outcomes[3].result is None and outcomes[3].error   # the worker died: no retry

    ray.init(num_cpus=2, include_dashboard=False)       # a connection someone else made
    again = tune_tasks(real_tasks[:1], where="ray:auto", cache=TuningCache(tmp_path / "again"))
    assert again[0].ok, again[0].error
    assert ray.is_initialized()                         # ... is left open
