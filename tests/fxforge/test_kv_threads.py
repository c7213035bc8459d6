"""The KV cache from several threads and from loops interleaved in one thread.

One compiled ``kv_cache`` module, or one loaded artifact, serves threads that generate different
prompts at different batch sizes, and loops that take turns in one thread: every caller gets
eager's greedy tokens, and decode steps still run from the cache (its counts are asserted). What
these catch: a cache shared by threads mixes their tokens; mixed batch sizes meet a cache of
another batch in ``fxforge::cached_attention``; interleaved loops that start each other's cache
over make every call a prefill; and a native buffer (kernel scratch, pack, replay recording)
shared by threads corrupts memory (``double free or corruption``), which the subprocess test
turns into a test failure instead of a crashed pytest.
"""
import json
import subprocess
import sys

import pytest
import torch

import fxforge

STEPS = 8
# (batch, prompt length) per thread: every batch size is shared by two or three threads
MIXED = [(1, 5), (2, 7), (3, 4), (1, 9), (2, 3), (3, 6), (2, 5), (1, 4)]


def prompt(batch, length, seed):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def plain_loop(fn, ids, steps=STEPS):
    """The classic loop: the whole sequence in, the greedy next token appended."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, fn(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def repeated(fn, ids, want, repetitions):
    """A thread's job: ``repetitions`` runs of ``fn`` on ``ids``, each giving ``want``."""
    def job():
        for rep in range(repetitions):
            got = fn(ids)
            assert torch.equal(got, want), f"{list(ids.shape)}, repetition {rep}: not eager's"
    return job


def test_run_threads_fails_the_test_on_an_error_in_any_thread(run_threads):
    """The threaded tests' verdicts rest on this: an assert failing in a thread must surface."""
    ran = []

    def fails():
        ran.append(1)
        assert False, "in a thread"
    with pytest.raises(AssertionError, match="in a thread"):
        run_threads([lambda: ran.append(1), fails, lambda: ran.append(1)])
    assert len(ran) == 3


def test_threads_with_different_prompts_get_their_own_tokens(tiny_gpt, tiny_gpt_artifact,
                                                             run_threads):
    loaded = fxforge.load(tiny_gpt_artifact)
    prompts = [prompt(1, 4 + i, seed=i) for i in range(4)]
    run_threads([repeated(lambda ids: plain_loop(loaded, ids), p, plain_loop(tiny_gpt, p), 3)
                 for p in prompts])
    stats = loaded.kv.stats
    assert stats["prefills"] + stats["steps"] == 4 * 3 * STEPS
    assert stats["steps"] >= 4 * 3 * (STEPS - 2)    # (an eviction under skew costs a prefill)


def test_interleaved_loops_in_one_thread_each_hit_the_cache(tiny_gpt, tiny_gpt_artifact):
    """Three plain loops taking turns in one thread: each call extends its own loop's tokens,
    so after each loop's prefill every call is a one-token step."""
    loaded = fxforge.load(tiny_gpt_artifact)
    loops = [prompt(2, 5 + i, seed=20 + i) for i in range(3)]
    want = [plain_loop(tiny_gpt, ids) for ids in loops]
    with torch.no_grad():
        for _ in range(STEPS):
            loops = [torch.cat([ids, loaded(ids)[:, -1].argmax(-1, keepdim=True)], 1)
                     for ids in loops]
    assert all(torch.equal(g, w) for g, w in zip(loops, want))
    stats = loaded.kv.stats
    assert stats["prefills"] == 3 and stats["steps"] == 3 * (STEPS - 1)
    assert stats["replayed"] >= 3 * (STEPS - 3)       # each loop's own recording


def test_eight_threads_through_one_artifact_get_eager_tokens(tiny_gpt, tiny_gpt_artifact,
                                                              run_threads):
    """Acceptance: 8 threads through one loaded artifact, half running the plain loop and half
    ``fxforge.generate``, at batch sizes 1-3: eager's tokens at each of 20 repetitions; the
    cache counts are printed (``-s``)."""
    repetitions = 20
    loaded = fxforge.load(tiny_gpt_artifact)
    prompts = [prompt(b, n, seed=40 + i) for i, (b, n) in enumerate(MIXED)]
    runners = [lambda ids: plain_loop(loaded, ids),
               lambda ids: fxforge.generate(loaded, ids, STEPS)]
    run_threads([repeated(runners[i % 2], p, plain_loop(tiny_gpt, p), repetitions)
                 for i, p in enumerate(prompts)])
    stats = loaded.kv.stats
    print(f"\n[kv threads] artifact, 8 threads x {repetitions} x {STEPS} tokens: {stats}")
    calls = 8 * repetitions * STEPS
    assert stats["prefills"] + stats["steps"] + stats["uncached"] == calls
    assert stats["steps"] >= calls // 2 and stats["replayed"] > 0


THREADS_THROUGH_A_MODULE = r"""
import json, sys, threading, torch, fxforge
from fxforge.compiler import recording
from fxforge.examples.small_gpt import make_model
repetitions, steps, cases = json.loads(sys.argv[1])
model = make_model(seed=1, n_layer=2, n_embd=64, n_head=2)
def loop(fn, ids):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, fn(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids
gen = torch.Generator().manual_seed(7)
prompts = [torch.randint(0, 512, (b, n), generator=gen) for b, n in cases]
wants = [loop(model, ids) for ids in prompts]
wrong = []
with recording() as graphs:   # dynamo may add graphs from the threads (pytorch#123177)
    compiled = fxforge.compile(model, kv_cache=True, max_seq_len=64, dynamic=True)
    for b in sorted({min(b, 2) for b, _ in cases}):   # dynamo: batch 1, then any other batch
        loop(compiled, torch.randint(0, 512, (b, 4), generator=gen))
    runners = [lambda ids: loop(compiled, ids),
               lambda ids: fxforge.generate(compiled, ids, steps)]
    def work(i):
        for _ in range(repetitions):
            try:
                if not torch.equal(runners[i % 2](prompts[i]), wants[i]):
                    wrong.append(list(prompts[i].shape))
            except Exception as exc:
                wrong.append(repr(exc)[:300])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
stats = [g.kv.stats for g in graphs if g.kv is not None]
print(json.dumps({"wrong": wrong, "graphs": len(graphs),
                  "stats": {k: sum(s[k] for s in stats) for k in stats[0]}}))
"""


@pytest.mark.parametrize("cases, repetitions", [
    pytest.param(MIXED, 20, marks=pytest.mark.slow, id="8 threads x 20"),
    pytest.param([c for c in MIXED if c[0] > 1], 3, id="5 threads x 3"),   # one dynamo graph
])
def test_threads_through_one_compiled_module_get_eager_tokens(cases, repetitions):
    """Acceptance, and the reproducer that aborted the process (``double free or
    corruption``): threads (plain loop and ``fxforge.generate``, mixed batch sizes) through one
    ``fxforge.compile`` module, in a subprocess so a crash fails this test instead of pytest."""
    done = subprocess.run([sys.executable, "-c", THREADS_THROUGH_A_MODULE,
                           json.dumps([repetitions, STEPS, cases])],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n[kv threads] module, {len(cases)} threads x {repetitions} x {STEPS} tokens: "
          f"{report['stats']} over {report['graphs']} dynamo graphs")
    assert report["wrong"] == []
    calls = len(cases) * repetitions * STEPS
    assert report["stats"]["steps"] >= calls // 2 and report["stats"]["replayed"] > 0
