"""Frozen weights never go stale (``.data`` writes included), each weight set keeps its build,
repeated compiles keep compiling, and a Triton backend without a device is an OptionsError."""
import gc
import logging
import weakref

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge import compiler
from fxforge.examples.small_gpt import make_model
from fxforge.testing import assert_close_to_eager


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def builds(monkeypatch):
    """How many times a compiled graph froze and lowered weights (a counter list)."""
    count = []
    real = compiler.CompiledGraph._build

    def counting(self, *args, **kwargs):
        count.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(compiler.CompiledGraph, "_build", counting)
    return count


@pytest.fixture
def compiled_calls(monkeypatch):
    """How many calls ran through an fxforge-compiled graph (not dynamo's eager fallback)."""
    count = []
    real = compiler.CompiledGraph.__call__

    def counting(self, *args):
        count.append(1)
        return real(self, *args)
    monkeypatch.setattr(compiler.CompiledGraph, "__call__", counting)
    return count


# --- item 3: writes through .data -------------------------------------------------------------

def test_data_copy_is_seen(caplog):
    model = MLP().eval()
    x = torch.randn(4, 8)
    compiled = fxforge.compile(model, (x,))
    with torch.no_grad():
        model.fc1.weight.data.copy_(torch.randn(16, 8))   # no version bump on the parameter
        with caplog.at_level(logging.WARNING, logger="fxforge"):
            assert_close_to_eager(compiled(x), model(x))
    assert "re-freezing" in caplog.text and "write through `.data`" in caplog.text


def test_data_assignment_is_seen(caplog):
    model = MLP().eval()
    x = torch.randn(4, 8)
    compiled = fxforge.compile(model, (x,))
    with torch.no_grad():
        model.fc2.weight.data = torch.randn(8, 16)      # new storage, same object and version
        with caplog.at_level(logging.WARNING, logger="fxforge"):
            assert_close_to_eager(compiled(x), model(x))
    assert "new storage" in caplog.text


def test_data_writes_are_seen_one_after_another_under_torch_compile():
    """Each kind of write, in turn, on one compiled module: every call equals eager."""
    model = MLP().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fxforge")
        assert_close_to_eager(compiled(x), model(x))
        writes = [lambda: model.fc1.weight.data.copy_(torch.randn(16, 8)),
                  lambda: model.fc1.bias.data.normal_(),
                  lambda: setattr(model.fc2.weight, "data", torch.randn(8, 16)),
                  lambda: model.fc2.weight.data.mul_(-2.0),
                  lambda: model.fc2.bias.mul_(3.0)]
        for write in writes:
            write()
            assert_close_to_eager(compiled(x), model(x))


@pytest.mark.parametrize("where", [(0, 0), (-1, -1), (9, 1)])
def test_one_element_written_through_data_is_seen_at_a_sampled_word(where):
    """The first and the last word of every weight are sampled (and 6 between): a write of
    one element there is seen (here the 5th of 8 words of a 16x8 fp32 weight holds elements
    72 and 73, i.e. [9, 0] and [9, 1]). Elsewhere it may not be: docs/ARCHITECTURE.md."""
    model = MLP().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fxforge")
        compiled(x)
        model.fc1.weight.data[where] += 1.0
        assert_close_to_eager(compiled(x), model(x))


def test_in_place_change_of_an_inference_tensor_is_seen():
    with torch.inference_mode():
        model = MLP().eval()
        x = torch.randn(3, 8)
        compiled = torch.compile(model, backend="fxforge")
        assert_close_to_eager(compiled(x), model(x))
        model.fc1.weight.copy_(torch.randn(16, 8))   # inference tensors keep no version counter
        assert_close_to_eager(compiled(x), model(x))


def test_kv_cache_decoder_sees_a_data_write_between_generations():
    model = make_model(seed=3, n_layer=1)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="fxforge", options={"kv_cache": True, "max_seq_len": 32})

    def eager(steps):
        with torch.no_grad():
            out = ids
            for _ in range(steps):
                out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    assert torch.equal(fxforge.generate(compiled, ids, 5), eager(5))
    head = next(p for n, p in model.named_parameters() if p.dim() == 2)
    head.data.copy_(torch.randn_like(head))
    assert torch.equal(fxforge.generate(compiled, ids, 5), eager(5))


# --- item 7: one build per weight set ---------------------------------------------------------

def test_alternating_instances_keep_their_own_build(builds):
    first, second = MLP().eval(), MLP().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        one, two = torch.compile(first, backend="fxforge"), torch.compile(second, backend="fxforge")
        for i in range(20):
            model, compiled = (first, one) if i % 2 == 0 else (second, two)
            assert_close_to_eager(compiled(x), model(x))
    assert len(builds) == 2


def test_threads_calling_two_instances_get_their_own_weights(builds, run_threads):
    models = [MLP().eval(), MLP().eval()]
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = [m(x) for m in models]
        compiled = [torch.compile(m, backend="fxforge") for m in models]
        compiled[0](x)   # dynamo's first compile, before the threads

    def loop(index):
        def job():
            with torch.no_grad():
                for call in range(10):
                    assert_close_to_eager(compiled[index](x), expected[index],
                                          f"instance {index}, call {call}")
        return job
    run_threads([loop(i % 2) for i in range(4)])   # an error in a thread fails the test
    assert len(builds) == 2


def test_more_weight_sets_than_kept_are_evicted_with_a_warning(caplog):
    from fxforge.weight_sets import MAX_WEIGHT_SETS
    models = [MLP().eval() for _ in range(MAX_WEIGHT_SETS + 1)]
    x = torch.randn(2, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fxforge"):
        for model in models + models[:1]:
            assert_close_to_eager(torch.compile(model, backend="fxforge")(x), model(x))
    assert "dropping the least recently used" in caplog.text


def test_replaced_parameters_release_the_old_build(builds, caplog):
    """New Parameter objects make a new weight set; the replaced one is dropped, not kept."""
    model = MLP().eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = torch.compile(model, backend="fxforge")
        compiled(x)
        old = weakref.ref(model.fc1.weight)
        for _ in range(6):
            model.fc1.weight = nn.Parameter(torch.randn(16, 8))
            assert_close_to_eager(compiled(x), model(x))
    gc.collect()
    assert old() is None
    assert len(builds) == 7 and "dropping" not in caplog.text


# --- item 5: repeated compiles keep compiling -------------------------------------------------

def test_twelve_compiles_of_one_class_all_run_compiled(compiled_calls, caplog):
    x = torch.randn(2, 8)
    with caplog.at_level(logging.WARNING):
        for _ in range(12):
            model = MLP().eval()
            with torch.no_grad():
                assert_close_to_eager(fxforge.compile(model, (x,))(x), model(x))
    assert len(compiled_calls) == 24
    assert "recompile_limit" not in caplog.text


def test_twelve_torch_compiles_with_options_all_run_compiled(compiled_calls):
    x = torch.randn(2, 8)
    with torch.no_grad():
        for _ in range(12):
            model = MLP().eval()
            compiled = torch.compile(model, backend="fxforge", options={"verify": True})
            assert_close_to_eager(compiled(x), model(x))
    assert len(compiled_calls) == 12


def test_dynamo_recompile_limit_fallback_is_a_fxforge_warning(caplog):
    model = MLP().eval()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1), \
            caplog.at_level(logging.WARNING, logger="fxforge"):
        compiled = torch.compile(model, backend="fxforge", dynamic=False)
        compiled(torch.randn(2, 8))
        compiled(torch.randn(3, 8))     # a second static shape: over the limit, runs eagerly
    records = [r for r in caplog.records if r.name == "fxforge" and "recompile limit" in r.message]
    assert records and records[0].levelno == logging.WARNING
    assert "run eagerly" in records[0].message and "forward" in records[0].message


# --- item 7: triton without a device ----------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_triton_backend_without_a_gpu_is_an_options_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fxforge.OptionsError, match="backend='triton' needs a GPU"):
        fxforge.compile(MLP(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")        # the interpreter runs it on the CPU
    assert fxforge.parse_options(backend="triton").backend == "triton"
