"""``fxforge.Session`` and the state pool behind the transparent KV-cache mode."""
import asyncio
import gc
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch

import fxforge
from fxforge.errors import OptionsError, SessionInUseError
from fxforge.kernels.shared_packs import live_packs
from fxforge.kv_runtime import DecodeState
from fxforge.sessions import StatePool, active_session
from fxforge.testing import assert_close_to_eager


def prompt(batch, length, seed):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def eager_greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------- the pool, on a stub decoder

def stub_pool(cap):
    """A pool over a decoder stand-in: states with no caches, whose tokens a test sets."""
    decoder = SimpleNamespace(replay=False, backend=None, plan=SimpleNamespace(caches=[]),
                              no_rollback="a stub that cannot roll back")
    return StatePool(lambda: DecodeState(decoder), cap)


def ran(pool, checkout, ids):
    """What a call on ``ids`` leaves in the state it checked out: its tokens cached; the state
    handed back."""
    state, _ = checkout
    state.tokens = ids
    pool.release(state)
    return state


def longer(ids, *tokens):
    return torch.cat([ids, torch.tensor([tokens] * ids.shape[0])], dim=1)


def test_a_call_gets_the_state_whose_tokens_it_extends_the_longest_match_first():
    pool, a, b = stub_pool(4), prompt(1, 5, seed=1), prompt(1, 5, seed=2)
    state_a = ran(pool, pool.checkout(a), a)
    state_a7 = ran(pool, pool.checkout(a), longer(a, 7))  # a again extends no state: a new one
    state_b = ran(pool, pool.checkout(b), b)
    assert len({state_a, state_a7, state_b}) == 3
    # each with the length of the prefix its cache holds: the call does not compare again
    assert pool.checkout(longer(b, 3)) == (state_b, 5)
    assert pool.checkout(longer(a, 7, 9)) == (state_a7, 6)   # a + 7 is longer than a
    assert pool.checkout(longer(a, 8)) == (state_a, 5)
    fresh, cached = pool.checkout(a)                          # a extends neither: a new state
    assert fresh not in (state_a, state_a7, state_b) and cached == 0


def test_at_its_cap_the_pool_reuses_the_least_recently_used_free_state(caplog):
    pool, a, b, c = stub_pool(2), prompt(1, 4, seed=1), prompt(1, 4, seed=2), prompt(1, 4, seed=3)
    state_a = ran(pool, pool.checkout(a), a)
    state_b = ran(pool, pool.checkout(b), b)
    ran(pool, pool.checkout(longer(a, 1)), longer(a, 1))  # a is now the most recently used
    with caplog.at_level(logging.INFO, "fxforge"):
        assert pool.checkout(c) == (state_b, 0)
    assert "least recently used" in caplog.text and len(pool.states()) == 2
    assert pool.checkout(longer(a, 1, 2)) == (state_a, 5)   # a kept its cache


def test_when_every_state_is_busy_a_call_gets_none_and_it_is_logged_once(caplog):
    pool = stub_pool(1)
    pool.checkout(prompt(1, 4, seed=1))                   # held by a call in progress
    with caplog.at_level(logging.INFO, "fxforge"):
        assert pool.checkout(prompt(1, 4, seed=2)) is None
        assert pool.checkout(prompt(1, 4, seed=3)) is None
    assert caplog.text.count("in use") == 1


def test_sessions_are_never_refused_and_their_states_are_reused_first(caplog):
    pool, holder = stub_pool(1), fxforge.Session()
    first, _ = pool.take(prompt(1, 4, seed=1), holder=weakref.ref(holder))
    with caplog.at_level(logging.INFO, "fxforge"):
        second, _ = pool.take(prompt(1, 4, seed=2), holder=weakref.ref(holder))
    assert second is not first and "more than max_sessions=1" in caplog.text
    pool.release(second, retired=True)                    # back to the cap: the free one goes
    assert pool.states() == [first]
    pool.release(first, retired=True)
    assert pool.checkout(prompt(1, 4, seed=3)) == (first, 0)   # handed back: reused first


def test_the_state_of_a_garbage_collected_session_is_free_again():
    pool = stub_pool(1)
    session = fxforge.Session()
    held, _ = pool.take(prompt(1, 4, seed=1), holder=weakref.ref(session))
    assert pool.checkout(prompt(1, 4, seed=2)) is None
    del session
    gc.collect()
    assert pool.checkout(prompt(1, 4, seed=2)) == (held, 0)


def test_generate_takes_only_a_session_as_session(tiny_gpt):
    with pytest.raises(TypeError, match="fxforge.Session"):
        fxforge.generate(tiny_gpt, prompt(1, 4, seed=0), 2, session="mine")


def test_max_sessions_is_validated():
    with pytest.raises(OptionsError, match="max_sessions"):
        fxforge.parse_options(kv_cache=True, max_sessions=0)
    assert fxforge.parse_options(max_sessions=3).max_sessions == 3


# ---------------------------------------------------------------- sessions on a real decoder

def test_a_session_keeps_its_caches_from_one_turn_to_the_next(tiny_gpt, tiny_gpt_artifact):
    """A chat's second turn (the first turn's tokens plus new ones) continues from the cache."""
    loaded, session = fxforge.load(tiny_gpt_artifact), fxforge.Session()
    first = prompt(1, 6, seed=3)
    turn = fxforge.generate(loaded, first, 5, session=session)
    assert torch.equal(turn, eager_greedy(tiny_gpt, first, 5))
    assert session.stats["prefills"] == 1 and session.stats["steps"] == 4
    second = longer(turn, 11, 12)
    answer = fxforge.generate(loaded, second, 5, session=session)
    assert torch.equal(answer, eager_greedy(tiny_gpt, second, 5))
    assert session.stats["prefills"] == 1 and session.stats["steps"] == 9
    with session:                               # a plain call in the block uses its cache too
        logits = loaded(longer(answer, 13))
    assert_close_to_eager([logits], [tiny_gpt(longer(answer, 13))])
    assert session.stats["steps"] == 10
    session.close()
    assert session.stats["steps"] == 10 and len(loaded.kv.states()) == 1


def test_a_session_keeps_no_dropped_graph_alive_and_keeps_counting_what_ran(tiny_gpt_artifact):
    """A session's caches for a graph the user dropped go with the graph (they serve nothing
    else); its stats still count the calls that ran there."""
    loaded, session = fxforge.load(tiny_gpt_artifact), fxforge.Session()
    fxforge.generate(loaded, prompt(1, 5, seed=8), 4, session=session)
    counted = session.stats
    assert counted["prefills"] == 1 and counted["steps"] == 3
    decoder, state = weakref.ref(loaded.kv), weakref.ref(loaded.kv.states()[0])
    del loaded
    gc.collect()
    assert decoder() is None and state() is None
    assert session.stats == counted
    again = fxforge.load(tiny_gpt_artifact)
    fxforge.generate(again, prompt(1, 5, seed=9), 2, session=session)
    assert session.stats["prefills"] == 2 and session.stats["steps"] == 4
    session.close()
    assert session.stats["prefills"] == 2 and session.stats["steps"] == 4


def test_a_decode_step_compares_its_tokens_with_the_cache_once(tiny_gpt, tiny_gpt_artifact,
                                                                 monkeypatch):
    """The pool compares a call's tokens with a state's to pick it and hands the match on: the
    state does not compare them again (a comparison is a device sync on a GPU). A session's
    state compares once per call too."""
    compared = []
    real = DecodeState.cached_prefix
    monkeypatch.setattr(DecodeState, "cached_prefix",
                        lambda state, ids: compared.append(1) or real(state, ids))
    loaded, ids, steps = fxforge.load(tiny_gpt_artifact), prompt(1, 5, seed=10), 6
    assert torch.equal(eager_greedy(loaded, ids, steps), eager_greedy(tiny_gpt, ids, steps))
    assert loaded.kv.stats["steps"] == steps - 1 and len(compared) == steps - 1
    compared.clear()
    fxforge.generate(loaded, prompt(1, 5, seed=11), steps, session=fxforge.Session())
    # the pool compares the new prompt with the free state once (it could share a prefix the
    # state rolls back to); then each decode step compares once
    assert len(compared) == 1 + steps - 1


def test_a_session_runs_one_call_at_a_time(tiny_gpt_artifact):
    loaded, session = fxforge.load(tiny_gpt_artifact), fxforge.Session()
    ids = prompt(1, 4, seed=4)
    with session.state_for(loaded.kv, ids):             # a call in progress (another thread's)
        with pytest.raises(SessionInUseError, match="its own Session"):
            with session:
                loaded(ids)
        with pytest.raises(SessionInUseError, match="close"):
            session.close()
    with session:
        loaded(ids)                                      # free again


def test_generate_hands_its_state_back_and_the_next_call_reuses_it(tiny_gpt, tiny_gpt_artifact):
    """Each ``generate`` runs in a session of its own; the state it hands back (caches and
    decode-step recording) serves the next one: one state, one recording."""
    loaded = fxforge.load(tiny_gpt_artifact)
    for seed in (5, 6, 7):
        ids = prompt(2, 5, seed=seed)
        assert torch.equal(fxforge.generate(loaded, ids, 6), eager_greedy(tiny_gpt, ids, 6))
    (state,) = loaded.kv.states()
    assert state.replay.spans[1].recordings == 1 and loaded.kv.stats["replayed"] >= 3 * 3


def test_states_share_the_compiled_kernels_and_their_packed_weights(tiny_gpt_artifact):
    """A state holds caches and buffers only: many sequences at once pack no weight again."""
    loaded = fxforge.load(tiny_gpt_artifact)
    packs = live_packs()
    loops = [prompt(1, 4 + i, seed=i) for i in range(4)]
    with torch.no_grad():
        for _ in range(3):
            loops = [torch.cat([ids, loaded(ids)[:, -1].argmax(-1, keepdim=True)], 1)
                     for ids in loops]
    assert len(loaded.kv.states()) == 4 and live_packs() == packs


# ---------------------------------------------------------------- activation: nesting, asyncio

def test_with_session_blocks_nest():
    outer, inner = fxforge.Session(), fxforge.Session()
    with outer:
        with inner:
            assert active_session() is inner
            with outer:                                  # the same session, entered again
                assert active_session() is outer
            assert active_session() is inner
        assert active_session() is outer
    assert active_session() is None


def test_asyncio_tasks_in_one_thread_each_see_their_own_session_block():
    """Two tasks of one event loop (one thread) enter blocks of one session and of another and
    leave them in an order no thread-wide stack follows: each task sees its own activation."""
    shared, other = fxforge.Session(), fxforge.Session()
    seen = []

    async def block(name, session, waits):
        with session:
            for _ in range(waits):                       # the other task runs meanwhile
                await asyncio.sleep(0)
                seen.append((name, active_session() is session))
            with other:
                await asyncio.sleep(0)
                seen.append((name, active_session() is other))
            seen.append((name, active_session() is session))
        seen.append((name, active_session() is None))

    async def main():
        await asyncio.gather(block("first", shared, 1), block("second", shared, 3))
    asyncio.run(main())
    assert len(seen) == 10 and all(ok for _, ok in seen), seen
    assert active_session() is None
