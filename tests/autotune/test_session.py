"""Tuning sessions: what kernels get in each mode, the cache behind them, and the ways in
(``options={"autotune": ...}``, AOT artifacts shipping their tuning results)."""
import json
import logging

import pytest
import torch

import fxforge
from fxforge.autotune import search as search_module
from fxforge.autotune.cache import CacheKey, TuningCache
from fxforge.autotune.session import choose, current, session
from fxforge.autotune.task import make_tunable
from fxforge.errors import OptionsError
from fxforge.kernels.linear_cpu import linear_cpu_space
from fxforge.kernels.linear_cpu_tuning import linear_task
from fxforge.kernels.tuning import Config
from fxforge.testing import assert_close_to_eager


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return TuningCache()


def _task():
    return linear_task(8, 32, 48, torch.float32, "relu", True, False)


def _space():
    return linear_cpu_space(8, 32, 48, torch.float32)


def test_outside_a_session_kernels_get_the_default_and_build_no_task():
    def never():
        raise AssertionError("the task must not be built outside a session")
    assert current() is None
    assert choose(_space(), never) == _space().default
    with session("off"):
        assert choose(_space(), never) == _space().default


def test_tune_stores_and_a_cache_session_measures_nothing(cache, monkeypatch):
    with session("tune", cache=cache) as tuning:
        config = choose(_space(), _task)
        again = choose(_space(), _task)           # same task: one search per session
    assert config == again and tuning.stats()["tuned"] == 1
    assert config in _space().configs
    calls = []
    monkeypatch.setattr("fxforge.autotune.session.search",
                        lambda *a, **k: calls.append(a) or search_module.search(*a, **k))
    with session("cache", cache=TuningCache()) as cached:   # a new process would do the same
        assert choose(_space(), _task) == config
    assert calls == [] and cached.stats()["cache"] == 1
    with session("tune", cache=TuningCache()) as warm:
        assert choose(_space(), _task) == config
    assert calls == [] and warm.stats() == {"default": 0, "cache": 1, "tuned": 0, "failed": 0}


def test_collect_mode_lists_what_is_missing_and_returns_defaults(cache):
    with session("collect", cache=cache) as collecting:
        assert choose(_space(), _task) == _space().default
    assert list(collecting.missing) == [_task()]


def test_a_cached_config_that_is_not_in_the_space_is_never_used(cache, caplog):
    task = _task()
    key = CacheKey.make("linear_cpu", task.source_hash, task.problem_dict)
    foreign = Config.of(candidate=0, threads=64, layout=5)
    cache.put(key, {"config": foreign.to_json()})
    with caplog.at_level(logging.WARNING, "fxforge.autotune"):
        with session("cache", cache=cache) as cached:
            assert choose(_space(), _task) == _space().default
    assert "not a valid config" in caplog.text and cached.stats()["default"] == 1


def test_a_corrupt_entry_is_ignored_and_retuned(cache):
    task = _task()
    key = CacheKey.make("linear_cpu", task.source_hash, task.problem_dict)
    cache.path_for(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path_for(key).write_text('{"key": {"kernel": "linear_cpu"}, "rec')   # truncated
    with session("tune", cache=cache) as tuning:
        config = choose(_space(), _task)
    assert tuning.stats()["tuned"] == 1 and cache.get(key)["config"] == config.to_json()


def test_options_accept_the_autotune_modes():
    from fxforge.options import parse_options
    assert parse_options(autotune=True).autotune == "tune"
    assert parse_options(autotune=False).autotune == "off"
    assert parse_options(autotune="cache").autotune == "cache"
    with pytest.raises(OptionsError, match="autotune"):
        parse_options(autotune="sometimes")


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):   # two linears with epilogues, one fusion group (residual+LN, gate)
        y = self.down(torch.nn.functional.gelu(self.up(x)))
        return self.norm(x + y) * torch.sigmoid(y)


def _compile_and_run(model, x, **options):
    torch._dynamo.reset()
    with fxforge.compiler.recording() as graphs:
        out = torch.compile(model, backend="fxforge", options=options)(x)
    return out, [pick for g in graphs for pick in g.tuning]


def test_autotune_option_tunes_then_a_warm_cache_serves_every_kernel(cache):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = model(x)
        out, picks = _compile_and_run(model, x, autotune=True, backend="cpu")
        assert_close_to_eager([out], [expected])
        assert {p.task.family for p in picks} == {"linear_cpu", "fused_cpp"}
        assert {p.source for p in picks} == {"tuned"}
        out2, picks2 = _compile_and_run(model, x, autotune=True, backend="cpu")
    assert_close_to_eager([out2], [expected])
    assert {p.source for p in picks2} == {"cache"} and len(picks2) == len(picks)
    assert [p.config for p in picks2] == [p.config for p in picks]


def test_an_aot_artifact_ships_its_tuning_results(cache, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model, x = TinyMLP().eval(), torch.randn(2, 8, 32)
    artifact = fxforge.aot_compile(model, (x,), tmp_path / "art", autotune=True, backend="cpu")
    bundle = json.loads((tmp_path / "art" / "tuning.json").read_text())
    shipped = {e["key"]["kernel"] for e in bundle["entries"]}
    assert len(bundle["entries"]) >= len(artifact.tuning) > 0 and "linear_cpu" in shipped
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "empty"))   # another machine's cache
    monkeypatch.setattr("fxforge.autotune.session.search",
                        lambda *a, **k: pytest.fail("loading an artifact must not measure"))
    loaded = fxforge.load(tmp_path / "art")
    assert {p.source for p in loaded.tuning} == {"cache"}
    assert [p.config for p in loaded.tuning] == [p.config for p in artifact.tuning]
    assert {p.task.family for p in loaded.tuning} == shipped == {"linear_cpu", "fused_cpp"}
    with torch.no_grad():
        assert_close_to_eager([loaded(x)], [model(x)])
