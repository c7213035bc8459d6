"""kernels/shared_packs.py: one packed copy per weight content, held only while used."""
import gc
import threading

import torch

from fxforge.kernels.shared_packs import content_key, live_packs, shared_pack


def _double(w):
    return w * 2


def test_equal_content_shares_one_pack_and_other_content_does_not():
    torch.manual_seed(1)
    weight = torch.randn(37, 19)
    calls = []
    pack = lambda w: calls.append(1) or _double(w)   # noqa: E731
    first = shared_pack("test double", weight, pack)
    assert torch.equal(first, weight * 2)
    assert shared_pack("test double", weight.clone(), pack) is first   # a copy: same bytes
    assert len(calls) == 1
    changed = weight.clone()
    changed[36, 18] += 1.0
    assert shared_pack("test double", changed, pack) is not first
    assert shared_pack("test triple", weight, lambda w: w * 3) is not first   # another layout
    as_view = torch.randn(19, 37).t()            # non-contiguous: keyed by its values
    assert shared_pack("test double", as_view, pack) is shared_pack("test double",
                                                                     as_view.contiguous(), pack)


def test_keys_tell_dtype_shape_and_values_apart():
    torch.manual_seed(2)
    weight = torch.randn(6, 4)
    assert content_key(weight) == content_key(weight.clone())
    assert content_key(weight) != content_key(weight.reshape(4, 6))
    assert content_key(weight) != content_key(weight.double())
    assert content_key(weight.to(torch.bfloat16))[0] == "torch.bfloat16"
    assert content_key(torch.empty(0, 3)) != content_key(torch.empty(3, 0))


def test_a_pack_lives_only_while_some_kernel_holds_it():
    torch.manual_seed(3)
    weight = torch.randn(64, 32)
    held = shared_pack("test lifetime", weight, _double)
    gc.collect()   # packs of earlier tests' modules still in reference cycles die here, not below
    before = live_packs()
    del held
    gc.collect()
    assert live_packs() == before - 1
    calls = []
    again = shared_pack("test lifetime", weight, lambda w: calls.append(1) or _double(w))
    assert calls == [1] and torch.equal(again, weight * 2)   # packed anew, not a stale entry


def test_threads_packing_the_same_weight_get_one_tensor():
    torch.manual_seed(4)
    weight = torch.randn(256, 64)
    results, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()
        results.append(shared_pack("test threads", weight.clone(), _double))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
