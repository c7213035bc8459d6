"""Fixtures shared by the KV-cache session tests (a tiny GPT and its ``kv_cache`` artifact), and
the ``run_threads`` fixture for the tests that call one compiled module from several threads."""
import pytest
import torch

import fxforge
from fxforge.examples.small_gpt import make_model
from fxforge.testing import run_in_threads

TINY_GPT = dict(seed=1, n_layer=2, n_embd=64, n_head=2)   # a decode step is ~1 ms


@pytest.fixture
def run_threads():
    """``run_threads(jobs)``: each job in its own thread; the first error a thread met raised."""
    return run_in_threads


@pytest.fixture(scope="session")
def tiny_gpt():
    return make_model(**TINY_GPT)


@pytest.fixture(scope="session")
def tiny_gpt_artifact(tiny_gpt, tmp_path_factory):
    """The folder of an AOT artifact of ``tiny_gpt`` with ``kv_cache`` (batch 1-8, up to 64
    positions); load it per test for fresh cache counts."""
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=64)
    folder = tmp_path_factory.mktemp("tiny_gpt") / "gpt"
    example = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    fxforge.aot_compile(tiny_gpt, (example,), folder, dynamic_shapes=({0: batch, 1: seq},),
                        kv_cache=True, max_seq_len=64)
    return folder
