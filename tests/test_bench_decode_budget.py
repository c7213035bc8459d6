"""bench/decode_budget.py's per-token breakdown on a tiny GPT: the rows, from the kernels out to
the generate loop, add up to the token (each is a timer minus the one nested in it), the
per-token overhead is the token outside the kernels, and the instrumented run still decodes
through the KV cache's replayed steps."""
import sys
from pathlib import Path

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.examples.small_gpt import make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_budget  # noqa: E402

ROWS = {"dynamo (guards, wrappers)", "fxforge entry (weights check, arguments)",
        "KV runtime (state, extension check, logits copy)", "replay loop, op-by-op glue",
        "generate loop (sampling, ids append)"}


def test_breakdown_rows_add_up_to_the_token():
    model = make_model(seed=4, n_layer=1)
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(9))
    torch._dynamo.reset()
    with torch.no_grad(), recording() as graphs:
        compiled = torch.compile(model, backend="fxforge", options={"kv_cache": True})
        fxforge.generate(compiled, prompt, 4)   # compiles, records and validates the step
        decoder = next(g.kv for g in graphs if g.kv is not None)
        replayed = decoder.stats["replayed"]
        parts = decode_budget.step_breakdown(compiled, prompt, 5)
    token, overhead = parts.pop("token"), parts.pop(decode_budget.OVERHEAD)
    assert set(parts) == set(decode_budget.KERNEL_KINDS) | ROWS
    assert sum(parts.values()) == pytest.approx(token, rel=1e-9, abs=1e-9)
    kernels = sum(parts[k] for k in decode_budget.KERNEL_KINDS)
    assert overhead == pytest.approx(token - kernels, rel=1e-9, abs=1e-9)
    # the timed 5-token run replayed its 4 decode steps (its prompt, the one generated before,
    # may also be served by rolling the cache back to the prompt's last position: one more)
    assert replayed + 4 <= decoder.stats["replayed"] <= replayed + 6


def test_outside_the_kernels_subtracts_each_nested_timer():
    per = {"token": 10.0, "model call": 9.0, "entry": 8.5, "step": 8.0, "replay": 7.0,
           "linears": 4.0, "attention": 1.0, "fused groups": 0.5, "ATen ops": 0.5}
    out = decode_budget._outside_the_kernels(per)
    assert out["generate loop (sampling, ids append)"] == 1.0
    assert out["dynamo (guards, wrappers)"] == 0.5
    assert out["fxforge entry (weights check, arguments)"] == 0.5
    assert out["KV runtime (state, extension check, logits copy)"] == 1.0
    assert out["replay loop, op-by-op glue"] == 1.0
    assert out[decode_budget.OVERHEAD] == 4.0
    op_by_op = decode_budget._outside_the_kernels({**per, "replay": 0.0})   # no replay: one row
    assert op_by_op["replay loop, op-by-op glue"] == 2.0
    assert op_by_op["KV runtime (state, extension check, logits copy)"] == 0.0
