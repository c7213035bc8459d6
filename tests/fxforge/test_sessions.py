"""``fxforge.Session`` and the state pool behind the transparent KV-cache mode."""
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
from fxforge.sessions import StatePool
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
    decoder = SimpleNamespace(replay=False, backend=None, plan=SimpleNamespace(caches=[]))
    return StatePool(lambda: DecodeState(decoder), cap)


def ran(pool, state, ids):
    """What a call on ``ids`` leaves in ``state``: its tokens cached; the state handed back."""
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
    assert pool.checkout(longer(b, 3)) is state_b
    assert pool.checkout(longer(a, 7, 9)) is state_a7     # a + 7 is longer than a
    assert pool.checkout(longer(a, 8)) is state_a
    assert pool.checkout(a) is not state_a                # a extends neither: a new state


def test_at_its_cap_the_pool_reuses_the_least_recently_used_free_state(caplog):
    pool, a, b, c = stub_pool(2), prompt(1, 4, seed=1), prompt(1, 4, seed=2), prompt(1, 4, seed=3)
    state_a = ran(pool, pool.checkout(a), a)
    state_b = ran(pool, pool.checkout(b), b)
    ran(pool, pool.checkout(longer(a, 1)), longer(a, 1))  # a is now the most recently used
    with caplog.at_level(logging.INFO, "fxforge"):
        assert pool.checkout(c) is state_b
    assert "least recently used" in caplog.text and len(pool.states()) == 2
    assert pool.checkout(longer(a, 1, 2)) is state_a      # a kept its cache


def test_when_every_state_is_busy_a_call_gets_none_and_it_is_logged_once(caplog):
    pool = stub_pool(1)
    pool.checkout(prompt(1, 4, seed=1))                   # held by a call in progress
    with caplog.at_level(logging.INFO, "fxforge"):
        assert pool.checkout(prompt(1, 4, seed=2)) is None
        assert pool.checkout(prompt(1, 4, seed=3)) is None
    assert caplog.text.count("in use") == 1


def test_sessions_are_never_refused_and_their_states_are_reused_first(caplog):
    pool, holder = stub_pool(1), fxforge.Session()
    first = pool.take(prompt(1, 4, seed=1), holder=weakref.ref(holder))
    with caplog.at_level(logging.INFO, "fxforge"):
        second = pool.take(prompt(1, 4, seed=2), holder=weakref.ref(holder))
    assert second is not first and "more than max_sessions=1" in caplog.text
    pool.release(second, retired=True)                    # back to the cap: the free one goes
    assert pool.states() == [first]
    pool.release(first, retired=True)
    assert pool.checkout(prompt(1, 4, seed=3)) is first   # handed back: reused before a new one


def test_the_state_of_a_garbage_collected_session_is_free_again():
    pool = stub_pool(1)
    session = fxforge.Session()
    held = pool.take(prompt(1, 4, seed=1), holder=weakref.ref(session))
    assert pool.checkout(prompt(1, 4, seed=2)) is None
    del session
    gc.collect()
    assert pool.checkout(prompt(1, 4, seed=2)) is held


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
    assert state.replay.recordings == 1 and loaded.kv.stats["replayed"] >= 3 * 3


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
