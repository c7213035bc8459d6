"""The Triton kernels as autotuning families: every surviving candidate runs (in the interpreter
here) and is checked against the reference; wrong, unbuildable and out-of-memory candidates are
recorded and never chosen; configs tuned at lowering are stored, found again and used.

Runs only with ``TRITON_INTERPRET=1`` (``make test`` sets it). Shapes are tiny: the interpreter
is slow, and its times mean nothing (no timing is asserted anywhere).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

import fxforge  # noqa: E402
from fxforge.autotune import session as session_mod  # noqa: E402
from fxforge.autotune.cache import CacheKey, TuningCache  # noqa: E402
from fxforge.autotune.search import search  # noqa: E402
from fxforge.autotune.session import session  # noqa: E402
from fxforge.autotune.task import make_tunable  # noqa: E402
from fxforge.compiler import recording  # noqa: E402
from fxforge.kernels import matmul, triton_tuning  # noqa: E402
from fxforge.kernels.tuning import Config, TuningSpace  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels run on the CPU only with TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """Generated kernels and tuning results go to a temp dir, not the user's cache."""
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "cache"))


def _linear_config(bm, bn, bk, warps, stages) -> Config:
    return Config.of(num_warps=warps, num_stages=stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     GROUP_M=1)


class _LaunchSpy:
    """Stands in for ``matmul._linear_kernel``: records each launch's config and lets a test
    break chosen configs (raise before the launch, corrupt the output after it)."""

    def __init__(self, kernel, faults=None):
        self.kernel, self.faults, self.launches = kernel, faults or {}, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            config = _linear_config(kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"],
                                    kwargs["num_warps"], kwargs["num_stages"])
            self.launches.append(config)
            fault = self.faults.get(config)
            if isinstance(fault, BaseException):
                raise fault
            self.kernel[grid](*args, **kwargs)
            if fault == "corrupt":
                args[4].view(-1)[0] += 1.0   # out_ptr: one wrong element
        return launch


def _check_all_ran(result, tunable) -> None:
    kept, pruned = tunable.space.survivors(tunable.problem)
    statuses = {r.config: r.status for r in result.records}
    assert sorted(statuses, key=repr) == sorted(tunable.space.configs, key=repr)
    assert all(statuses[c] == "ok" for c in kept), [(r.label, r.status, r.reason)
                                                   for r in result.records if r.status != "pruned"]
    assert all(statuses[c] == "pruned" and reason for c, reason in pruned.items())
    assert result.best in kept and result.strategy == "exhaustive"


# --- (a) each family: every surviving candidate of the real space runs and is correct ------------

@pytest.mark.parametrize("dtype,activation,bias,residual", [
    (torch.float32, "gelu", True, True), (torch.bfloat16, "silu", True, False)])
def test_linear_family_runs_every_survivor(dtype, activation, bias, residual):
    task = triton_tuning.linear_task(32, 64, 64, dtype, activation, bias, residual)
    tunable = make_tunable(task)
    assert task.problem_dict["M"] == 32 and task.device == "cpu" and not tunable.parallel_build
    result = search(tunable, strategy="exhaustive", rounds=1)
    _check_all_ran(result, tunable)
    assert result.measured >= 2 and result.pruned >= 8   # the big CUDA tiles are pruned here


def test_attention_family_runs_every_survivor_with_gqa_causal_and_a_mask():
    task = triton_tuning.attention_task(1, 2, 1, 64, 64, 16, torch.float32, True, "bool")
    tunable = make_tunable(task)
    result = search(tunable, strategy="exhaustive", rounds=1)
    _check_all_ran(result, tunable)
    assert result.measured >= 3


def test_attention_additive_mask_bf16_and_bucketed_lengths():
    task = triton_tuning.attention_task(1, 2, 2, 20, 24, 32, torch.bfloat16, False, "additive")
    assert (task.problem_dict["Lq"], task.problem_dict["Lk"]) == (32, 32)
    tunable = make_tunable(task)
    _check_all_ran(search(tunable, strategy="exhaustive", rounds=1), tunable)


def _fusion_group():
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxforge.irgraph import decomposition_table
    from fxforge.kernels.fused import build_program
    gm = make_fx(lambda x, w: (torch.softmax(x * 0.5, -1) * w,),
                 decomposition_table=decomposition_table())(torch.randn(4, 32), torch.randn(32))
    return build_program(gm)


def test_fused_family_runs_every_survivor():
    program = _fusion_group()
    task = triton_tuning.fused_task(program, [((3, 32), torch.float32), ((32,), torch.float32)])
    tunable = make_tunable(task)
    assert task.problem_dict == {"rows": 4, "N": 32}
    assert tunable.space.default == triton_tuning.fused_triton.default_config(4, 32)
    result = search(tunable, strategy="exhaustive", rounds=1)
    _check_all_ran(result, tunable)
    kept = [r.config for r in result.records if r.status == "ok"]
    # Whole-row tiles (the default's width) and looped 64-wide ones, every BLOCK_R <= rows.
    assert {c["BLOCK_N"] for c in kept} == {32, 64} and {c["BLOCK_R"] for c in kept} == {1, 2, 4}


# --- (b) wrong, unbuildable and out-of-memory candidates are recorded, never chosen --------------

GOOD = _linear_config(16, 32, 32, 2, 2)
ALSO_GOOD = _linear_config(16, 16, 32, 2, 2)
WRONG = _linear_config(32, 32, 32, 4, 2)
NO_BUILD = _linear_config(16, 32, 32, 4, 3)
OOM = _linear_config(32, 32, 32, 2, 3)


@pytest.fixture
def faulty_linear(monkeypatch):
    """A five-config matmul space (small enough for the interpreter) in which three configs
    are broken at launch: one corrupts its output, one fails to compile, one runs out of memory."""
    space = TuningSpace("fxforge.linear", (GOOD, WRONG, NO_BUILD, OOM, ALSO_GOOD), default=GOOD,
                        prune=matmul.prune)
    spy = _LaunchSpy(matmul._linear_kernel, {
        WRONG: "corrupt",
        NO_BUILD: RuntimeError("triton.CompilationError: out of resources (injected)"),
        OOM: torch.OutOfMemoryError("CUDA out of memory (injected)"),
    })
    monkeypatch.setattr(matmul, "TUNING_SPACE", space)
    monkeypatch.setattr(matmul, "_UNTUNED", {})
    monkeypatch.setattr(matmul, "_linear_kernel", spy)
    return spy


def test_broken_candidates_are_recorded_and_never_chosen(faulty_linear):
    tunable = make_tunable(triton_tuning.linear_task(32, 32, 32, torch.float32, "relu", True, False))
    result = search(tunable, strategy="exhaustive", rounds=1)
    records = {r.config: r for r in result.records}
    assert {c: r.status for c, r in records.items()} == {
        GOOD: "ok", ALSO_GOOD: "ok", WRONG: "wrong", NO_BUILD: "build_failed", OOM: "oom"}
    assert "max abs diff" in records[WRONG].reason
    assert "injected" in records[NO_BUILD].reason and "out of memory" in records[OOM].reason
    assert result.best in (GOOD, ALSO_GOOD)


def test_a_session_tuning_a_direct_call_skips_the_broken_configs(faulty_linear, tmp_path):
    x, weight = torch.randn(32, 32), torch.randn(32, 32) / 32 ** 0.5
    with session("tune", cache=TuningCache(tmp_path / "tuning")) as active:
        out = matmul.triton_linear(x, weight, activation="relu")
    (pick,) = {p.task: p for p in active.picks}.values()
    assert pick.source == "tuned" and pick.config in (GOOD, ALSO_GOOD)
    assert faulty_linear.launches[-1] == pick.config   # the call itself ran the tuned config
    torch.testing.assert_close(out, torch.relu(x @ weight), rtol=1e-4, atol=1e-5)


# --- (c) lowering in a session stores the picks; a "cache" session finds them, measures nothing --

def _compile_small_gpt(mode: str, cache: TuningCache):
    from fxforge.examples.small_gpt import example_inputs, make_model
    model = make_model(n_layer=1, n_embd=32, n_head=2, vocab_size=64).eval()
    inputs = example_inputs(batch=1, seq=8, vocab_size=64)
    # max_fraction: a few candidates of the fused kernels' 100 (the interpreter is slow)
    with session(mode, cache=cache, max_fraction=0.04) as active, recording(), torch.no_grad():
        got = fxforge.compile(model, inputs, backend="triton")(*inputs)
        want = model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return active


def test_lowering_tunes_once_then_the_cache_answers(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "tuning")
    tuned = _compile_small_gpt("tune", cache)
    families = {p.task.family for p in tuned.picks}
    assert families == {"triton_linear", "triton_attention", "triton_fused"}
    assert tuned.stats()["tuned"] == len({p.task for p in tuned.picks}) == len(cache.entries())

    def no_search(*args, **kwargs):
        raise AssertionError("a 'cache' session must not measure anything")
    monkeypatch.setattr(session_mod, "search", no_search)
    cached = _compile_small_gpt("cache", cache)
    assert cached.stats() == {"default": 0, "cache": tuned.stats()["tuned"], "tuned": 0, "failed": 0}
    assert {p.task: p.config for p in cached.picks} == {p.task: p.config for p in tuned.picks}


def test_a_tuned_config_chosen_at_lowering_is_the_one_the_calls_use(tmp_path, monkeypatch):
    spy = _LaunchSpy(matmul._linear_kernel)
    monkeypatch.setattr(matmul, "_linear_kernel", spy)
    task = triton_tuning.linear_task(32, 64, 64, torch.float32, "none", True, False)
    space = triton_tuning.linear_space(task.problem_dict)
    survivors, _ = space.survivors(task.problem_dict)
    tuned = next(c for c in survivors if c != space.default)   # as if it had won a search
    cache = TuningCache(tmp_path / "tuning")
    cache.put(CacheKey.make(space.kernel, task.source_hash, task.problem_dict, task.device),
              {"config": tuned.to_json()})
    model, x = nn.Linear(64, 64).eval(), torch.randn(32, 64)
    with session("cache", cache=cache) as active, recording() as graphs, torch.no_grad():
        compiled = fxforge.compile(model, (x,), backend="triton")
    assert [p.source for p in active.picks] == ["cache"]
    assert any(f"tuned {tuned.describe()}" in c.reason for g in graphs for c in g.lowered.choices)
    spy.launches.clear()
    with torch.no_grad():   # no session open now: the bound config is used, not the default
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert spy.launches == [tuned]


def test_a_bound_config_serves_only_its_shape_bucket():
    from fxforge.backends.triton import _linear_call
    seen = []
    fn = lambda x, w, **kwargs: seen.append(kwargs["config"])  # noqa: E731
    bound = dict(fn=fn, activation="none", out_dtype=None, has_bias=False, has_residual=False,
                 tuned=(32, GOOD))
    for rows in (17, 32, 8, 33):
        _linear_call(torch.empty(rows, 4), torch.empty(4, 4), **bound)
    assert seen == [GOOD, GOOD, None, None]


def test_outside_a_session_the_launch_config_is_the_untuned_heuristic():
    x, weight = torch.randn(8, 32), torch.randn(32, 48)
    want = matmul.choose_config(matmul.linear_problem(x, weight))
    assert matmul.launch_config(x, weight, None, "none", None, None) == want
    with session("off"):
        assert matmul.launch_config(x, weight, None, "none", None, None) == want
    task = triton_tuning.linear_task(8, 32, 48, torch.float32, "none", False, False)
    assert triton_tuning.linear_space(task.problem_dict).default == want   # the tuner's baseline
