"""Recording a CPU call (ATen ops + C kernels) and replaying it on new input values."""
import pytest
import torch

from fxforge.kernels import gemv_cpu
from fxforge.kernels.gemv_cpu import GemvLinear
from fxforge.kernels.replay import Recording, Unreplayable

needs_compiler = pytest.mark.skipif(gemv_cpu.gemv_unavailable() is not None,
                                    reason="no C++ compiler for the GEMV kernel")


def _step(weight_kernel, bias):
    def step(ids, position, table, cache):
        x = torch.nn.functional.embedding(ids, table).reshape(ids.shape[1], -1)   # view + op
        x = x * (position.to(torch.float32) + 1.0)                  # reads the position input
        y = weight_kernel(x, None)                                   # a C kernel launch
        cache[position] = y                                          # in-place into a kept buffer
        return (y.relu() + bias).unsqueeze(0), cache.sum(0)
    return step


@needs_compiler
def test_a_view_op_that_copies_is_replayed():
    """``reshape`` is declared a view, but of a permuted tensor of several rows (an attention
    output of a verify span) it copies: the copy must be redone at every replay, or the kernel
    after it reads the first call's values."""
    gen = torch.Generator().manual_seed(3)
    kernel = GemvLinear(torch.randn(12, 12, generator=gen), None, "none")

    def step(heads):   # [B, H, t, D] -> [t, H * D] -> linear, as a lowered graph calls the op
        rows = torch.ops.aten.reshape.default(heads.permute(0, 2, 1, 3), [heads.shape[2], -1])
        return kernel(rows, None)

    with torch.inference_mode():   # as models run: reshape then reaches the recording whole
        rec = Recording(step, [torch.randn(1, 3, 4, 4, generator=gen)])
        for _ in range(3):
            new = torch.randn(1, 3, 4, 4, generator=gen)
            torch.testing.assert_close(rec.replay([new]).clone(), step(new), rtol=1e-6, atol=1e-6)


@needs_compiler
def test_replay_on_new_values_equals_the_direct_call():
    torch.manual_seed(0)
    table, bias = torch.randn(50, 16), torch.randn(24)
    step = _step(GemvLinear(torch.randn(24, 16), None, "silu"), bias)
    cache_a, cache_b = torch.zeros(8, 24), torch.zeros(8, 24)
    args = [torch.tensor([[3]]), torch.tensor([0]), table, cache_a]
    rec = Recording(step, args, keep=[2, 3])
    step(args[0], args[1], table, cache_b)            # the reference cache sees the same first call
    for pos in range(1, 6):
        new = [torch.randint(0, 50, (1, 1)), torch.tensor([pos]), table, cache_a]
        assert rec.matches(new)
        got = [t.clone() for t in rec.replay(new)]
        want = step(*[new[0], new[1], table, cache_b])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache_a[1:6], cache_b[1:6], rtol=1e-6, atol=1e-6)


def test_matches_requires_same_shapes_values_and_kept_buffers():
    table, cache = torch.randn(10, 4), torch.zeros(4)
    rec = Recording(lambda ids, n, t, c: t[ids].sum() * n + c, [torch.tensor([1]), 2, table, cache],
                    keep=[2, 3])
    assert rec.matches([torch.tensor([5]), 2, table, cache])
    assert not rec.matches([torch.tensor([5, 6]), 2, table, cache])        # another shape
    assert not rec.matches([torch.tensor([5]), 3, table, cache])           # another int
    assert not rec.matches([torch.tensor([5]), 2, table.clone(), cache])   # another buffer
    assert not rec.matches([torch.tensor([5.0]), 2, table, cache])         # another dtype


@pytest.mark.parametrize("body, reason", [
    (lambda x: x * x.sum().item(), "into Python"),
    (lambda x: x + torch.rand_like(x), "random"),
])
def test_what_a_replay_cannot_reproduce_is_refused(body, reason):
    with pytest.raises(Unreplayable, match=reason):
        Recording(body, [torch.randn(3)])


def test_constants_and_allocations_are_not_rerun():
    calls = []

    def fn(x):
        calls.append(1)
        return x + torch.arange(3) + torch.empty(3).fill_(1.0)
    rec = Recording(fn, [torch.zeros(3)])
    out = rec.replay([torch.ones(3)])
    assert calls == [1]                        # the Python function itself never runs again
    assert torch.equal(out, torch.tensor([2.0, 3.0, 4.0]))


def test_every_compiled_cpu_kernel_is_launched_through_launch():
    """A kernel called directly would be missing from a replay; every module that loads a
    compiled function must launch it through kernels.replay.launch."""
    from pathlib import Path

    import fxforge.kernels
    folder = Path(fxforge.kernels.__file__).parent
    for path in folder.glob("*.py"):
        text = path.read_text()
        if path.name in ("cache_trust.py", "toolchain.py"):   # build and open libraries; call no kernel
            continue
        if "load_function(" in text or "ctypes.CDLL(" in text:
            assert "launch(" in text, f"{path.name} loads a compiled kernel but never uses launch()"


def test_a_recording_sees_only_the_launches_of_its_own_thread():
    """Another thread's kernel launch during a recording is not part of it: a replay would call
    that kernel again on pointers into the other thread's freed temporaries (memory corruption
    when several threads decode through one compiled module)."""
    import threading

    from fxforge.kernels.replay import launch
    recording_started, other_launched = threading.Event(), threading.Event()
    mine, theirs = [], []

    def my_kernel(n):
        mine.append(n)
        return 0

    def their_kernel(n):
        theirs.append(n)
        return 0

    def step(x):
        launch(my_kernel, (1,))
        recording_started.set()
        assert other_launched.wait(30)            # the other thread launches mid-recording
        return x + 1

    def other_thread():
        assert recording_started.wait(30)
        launch(their_kernel, (2,))
        other_launched.set()
    worker = threading.Thread(target=other_thread)
    worker.start()
    rec = Recording(step, [torch.zeros(2)])
    worker.join()
    assert "their_kernel" not in rec.labels and rec.labels.count("my_kernel") == 1
    rec.replay([torch.ones(2)])
    assert mine == [1, 1] and theirs == [2]        # the replay re-ran only its own launch


def test_a_cuda_graph_runner_runs_a_shape_it_did_not_capture_outside_its_lock():
    """The runner's lock guards its static buffers (warm-up, capture, copy-in, replay, copy-out);
    a call of another shape uses none of them and runs eagerly without the lock, so threads
    calling other shapes are not serialized. (No CUDA here: the captured graph is a stand-in.)"""
    from fxforge.backends.triton import CUDAGraphRunner
    locked = []

    def graph(x):
        locked.append(runner.lock.locked())
        return x + 1
    runner = CUDAGraphRunner(graph, warmup=1)
    runner(torch.zeros(2))                      # the warm-up: under the lock, before a capture
    runner.graph = object()                     # as if captured for float32 [2] on the CPU
    runner.signature = ((torch.Size([2]), torch.float32, torch.device("cpu")),)
    assert torch.equal(runner(torch.zeros(3)), torch.ones(3))
    assert locked == [True, False]
