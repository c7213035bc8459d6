"""quantize="auto" with accuracy_budget: the option, the choice on given tables, the back-off,
end to end on small models (measured change within the budget), explain's table, the CSV
report and AOT artifacts. Speeds are injected (``measuring_speed``): no verdict depends on time."""
import math
import re
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge
from fxforge.compiler import recording
from fxforge.errors import OptionsError
from fxforge.irgraph.views import Linear
from fxforge.options import parse_options
from fxforge.passes import quantize_auto
from fxforge.passes.quantize_plan import (BUDGET_STEPS, DENSE, bytes_per_call, choose,
                                          formats_for, layer_seconds, measuring_speed,
                                          plan_within, upper_bound)
from fxforge.calibration import calibration_text
from fxforge.quant_report import (LAYER_COLUMNS, on_frontier, read_csv, write_frontier_csv,
                                  write_layers_csv)
from fxforge import quant_speed
from fxforge.quant_speed import cpu_layer_seconds

FORMATS = ("int8_channel", "int4_g128", "int4_g64", "int4_g32")


def by_bytes(k, n, formats):
    """Injected speed: a call's time is its bytes read (what decode is bound by)."""
    return {f: bytes_per_call(k, n, f) * 1e-10 for f in formats}


class TinyLM(nn.Module):
    """A causal-LM-shaped model: embedding, two residual blocks (numbered), an LM head."""

    def __init__(self, vocab=96, hidden=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(hidden, 128),
                                                   "down": nn.Linear(128, hidden)})
                                    for _ in range(2))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](x)))
        return self.head(x)


def _compile(model, inputs, **options):
    with recording() as graphs, measuring_speed(by_bytes):
        compiled = fxforge.compile(model, inputs, backend="cpu", **options)
        out = compiled(*inputs)
    return out, graphs[0].ir


def _kl(ref_logits, logits):
    ref = F.log_softmax(ref_logits.float(), -1)
    return float((ref.exp() * (ref - F.log_softmax(logits.float(), -1))).sum(-1).mean())


# ---- the option --------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"quantize": "auto"}, "needs accuracy_budget"),
    ({"quantize": "int8", "accuracy_budget": {"kl": 0.1}}, "applies to quantize='auto' only"),
    ({"accuracy_budget": {"kl": 0.1}}, "applies to quantize='auto' only"),
    ({"quantize": "auto", "accuracy_budget": {"top1": 0.1}}, "unknown accuracy_budget metric 'top1'"),
    ({"quantize": "auto", "accuracy_budget": {"kl": -0.5}}, "finite number >= 0"),
    ({"quantize": "auto", "accuracy_budget": {"kl": math.nan}}, "finite number >= 0"),
    ({"quantize": "auto", "accuracy_budget": {"kl": "small"}}, "finite number >= 0"),
    ({"quantize": "auto", "accuracy_budget": {"kl": 0.1, "ppl": 0.1}}, "names one metric"),
    ({"quantize": "auto", "accuracy_budget": 0.1}, "must be a dict"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(OptionsError, match=message):
        parse_options(options)


def test_option_round_trips_and_mixes_with_rules():
    options = parse_options(quantize={"default": "auto", "head": "int8"}, accuracy_budget={"ppl": 0.02})
    assert options.accuracy_budget == ("ppl", 0.02)
    assert ("*", "auto") in options.quantize and ("head", "int8_channel:rtn") in options.quantize
    again = parse_options(options.to_dict())
    assert again == options and hash(again) == hash(options)
    assert parse_options(quantize="auto", accuracy_budget={"kl": 0.1}) != \
        parse_options(quantize="auto", accuracy_budget={"kl": 0.2})   # part of the cache key


# ---- the choice on given tables ------------------------------------------------------------------

def _tables(gen, layers=6):
    """Per layer: dense 0 cost; formats cheaper in time cost more accuracy (random scales)."""
    costs, seconds = [], []
    for _ in range(layers):
        scale = float(torch.rand(1, generator=gen)) + 0.1
        costs.append({DENSE: 0.0, **{f: scale * c for f, c in zip(FORMATS, (0.01, 0.05, 0.08, 0.12))}})
        size = float(torch.rand(1, generator=gen)) + 0.5
        seconds.append({DENSE: 4 * size, **{f: size * t for f, t in zip(FORMATS, (1.0, 0.55, 0.52, 0.5))}})
    return costs, seconds


def _brute_force(costs, seconds, budget):
    import itertools
    best = None
    for combo in itertools.product(*[sorted(c) for c in costs]):
        cost = sum(c[f] for c, f in zip(costs, combo))
        time = sum(s[f] for s, f in zip(seconds, combo))
        if cost <= budget and (best is None or time < best[0]):
            best = (time, combo)
    return best


def test_choose_respects_the_budget_and_is_near_optimal():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    costs, seconds = _tables(gen, layers=5)
    for budget in (0.0, 0.02, 0.1, 0.3, 10.0):
        plan = choose(costs, seconds, budget)
        assert sum(c[f] for c, f in zip(costs, plan)) <= budget + 1e-12
        best_time, _ = _brute_force(costs, seconds, budget)
        time = sum(s[f] for s, f in zip(seconds, plan))
        # exact up to costs rounded up to budget / BUDGET_STEPS: never better than optimal,
        # and at least as good as the optimum of a budget smaller by one unit per layer
        assert time >= best_time - 1e-12
        tight = _brute_force(costs, seconds, budget * (1 - len(costs) / BUDGET_STEPS))
        assert time <= tight[0] + 1e-12
    assert choose(costs, seconds, 0.0) == [DENSE] * len(costs)
    assert set(choose(costs, seconds, 10.0)) == {"int4_g32"}   # all fit: the fastest everywhere


def test_choose_prefers_faster_formats_and_is_deterministic():
    costs = [{DENSE: 0.0, "int8_channel": 0.001, "int4_g32": 0.001}] * 3
    seconds = [{DENSE: 4.0, "int8_channel": 1.0, "int4_g32": 0.5}] * 3
    assert choose(costs, seconds, 0.01) == ["int4_g32"] * 3
    same = [{DENSE: 4.0, "int8_channel": 1.0, "int4_g32": 1.0}] * 3   # a tie: the cheaper cost
    costs2 = [{DENSE: 0.0, "int8_channel": 0.001, "int4_g32": 0.002}] * 3
    assert choose(costs2, same, 0.01) == ["int8_channel"] * 3
    gen = torch.Generator().manual_seed(1)
    costs3, seconds3 = _tables(gen)
    assert choose(costs3, seconds3, 0.15) == choose(costs3, seconds3, 0.15)
    with pytest.raises(ValueError, match="dense"):
        choose([{"int8_channel": 0.0}], [{"int8_channel": 1.0}], 1.0)


def test_negative_changes_are_not_budget_to_spend():
    costs = [{DENSE: 0.0, "int4_g32": -0.5}, {DENSE: 0.0, "int4_g32": 0.6}]
    seconds = [{DENSE: 2.0, "int4_g32": 1.0}] * 2
    assert choose(costs, seconds, 0.5) == ["int4_g32", DENSE]
    calls = []   # the helpful layer's real effect is a cost: shrinking the budget cannot help
    plan = plan_within(costs, seconds, 0.0, lambda formats: calls.append(formats) or 0.1)
    assert plan == ([DENSE, DENSE], 0.0, 1) and len(calls) == 1


def test_plan_backs_off_when_the_measured_total_exceeds_the_budget():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    costs, seconds = _tables(gen)
    budget, verified = 0.2, []

    def superadditive(plan):   # the layers' changes compound: twice their sum
        verified.append(plan)
        return 2 * sum(c[f] for c, f in zip(costs, plan))

    plan, measured, rounds = plan_within(costs, seconds, budget, superadditive)
    assert measured <= budget and measured == superadditive(plan)
    assert rounds > 1 and verified[0] != plan   # the first plan was over: a smaller one won
    first_time = sum(s[f] for s, f in zip(seconds, verified[0]))
    assert sum(s[f] for s, f in zip(seconds, plan)) >= first_time
    always_over = plan_within(costs, seconds, budget, lambda plan: budget * 2)
    assert always_over[0] == [DENSE] * len(costs) and always_over[1] == 0.0


def test_upper_bound_covers_the_mean_of_text_it_did_not_see():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    assert upper_bound(torch.full((40,), 0.3)) == pytest.approx(0.3)   # no spread: the mean
    assert upper_bound(torch.tensor([0.7])) == pytest.approx(0.7)      # one position: the mean
    exponential = lambda *shape: -torch.log1p(-torch.rand(*shape, generator=gen)) / 20  # noqa: E731
    bursty = exponential(512)   # per-token KL-like terms: positive, skewed, mean 0.05
    assert upper_bound(bursty) > float(bursty.mean())
    # Against its definition: mean + t(15, 90%) * sd(16 chunk means) / 4.
    means = torch.stack([c.mean() for c in torch.tensor_split(bursty.double(), 16)])
    assert upper_bound(bursty) == pytest.approx(float(bursty.mean() + 1.341 * means.std() / 4))
    # Coverage: the bound of a sample exceeds the true mean (0.05) in about 90% of samples.
    draws = exponential(400, 512)
    covered = sum(upper_bound(d) >= 0.05 for d in draws) / len(draws)
    assert 0.8 <= covered <= 0.97, covered


def test_layer_seconds_are_cached_and_injectable(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr("fxforge.quant_speed.kernels_unavailable", lambda: None)

    def fake_kernels(k, n, formats):
        calls.append((k, n))
        return {f: 1e-6 * (i + 1) for i, f in enumerate(formats)}
    monkeypatch.setattr("fxforge.quant_speed.measure_kernels", fake_kernels)
    first = cpu_layer_seconds(64, 32, (DENSE, "int8_channel"))
    again = cpu_layer_seconds(64, 32, (DENSE, "int8_channel"))
    assert first == again == {DENSE: 1e-6, "int8_channel": 2e-6} and calls == [(64, 32)]
    with measuring_speed(by_bytes):   # an injected measurement is what the pass reads
        assert layer_seconds(64, 32, (DENSE,)) == {DENSE: 64 * 32 * 4 * 1e-10}
    # nothing installed (another backend): the bytes read stand in
    assert layer_seconds(64, 32, ("int8_channel",)) == by_bytes(64, 32, ["int8_channel"])
    assert formats_for(576) == (DENSE, "int8_channel", "int4_g64", "int4_g32")
    assert formats_for(100) == (DENSE, "int8_channel")


@pytest.mark.skipif(quant_speed.kernels_unavailable() is not None, reason="no C++ kernels")
@pytest.mark.parametrize("fmt", [DENSE, "int8_channel", "int4_g32"])
def test_speed_is_timed_on_weights_streamed_from_memory(fmt, monkeypatch):
    """Each timed call takes the next of enough distinct weights to pass the working set (a
    decode step's weights come from memory; one weight timed alone stays in the caches)."""
    monkeypatch.setattr("fxforge.kernels.linear_cpu_tuning.WORKING_SET_BYTES", 1 << 17)
    weight = torch.randn(48, 64) * 0.05
    kernels = quant_speed._copies(fmt, weight)
    nbytes = {DENSE: 4 * 64, "int8_channel": 64 + 2, "int4_g32": 32 + 2 * 2 * 2}[fmt] * 48
    assert len(kernels) == min(48, -(-(1 << 17) // nbytes)) and len(kernels) * nbytes >= min(
        1 << 17, 48 * nbytes)
    assert len({k.weight.data_ptr() for k in kernels}) == len(kernels)   # distinct packs
    x = torch.randn(1, 64)
    outputs = [k(x, None) for k in kernels[:2]]
    assert not torch.equal(outputs[0], outputs[1])   # distinct weights, not one pack twice


def test_the_cpu_backend_installs_its_kernel_timings(monkeypatch):
    """quantize="auto" on the CPU backend weighs formats by the kernels' own speed."""
    seen = []

    def fake(k, n, formats, cache=None):
        seen.append((k, n))
        return {f: 1e-6 for f in formats}
    monkeypatch.setattr("fxforge.quant_speed.cpu_layer_seconds", fake)
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    compiled = fxforge.compile(model, (ids,), backend="cpu", quantize="auto",
                               accuracy_budget={"kl": 0.01})
    compiled(ids)
    assert sorted(set(seen)) == [(64, 96), (64, 128), (128, 64)]


# ---- end to end ------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.002, 0.02])
def test_auto_compiles_within_its_kl_budget(budget):
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (2, 24))
    out, ir = _compile(model, (ids,), quantize="auto", accuracy_budget={"kl": budget})
    with torch.no_grad():
        kl = _kl(model(ids), out)
    plan = ir.info["quantize_auto"]
    assert kl <= budget * 1.01 + 1e-6, plan
    assert plan["measured"] <= plan["upper"] <= budget
    assert abs(plan["measured"] - kl) <= 0.05 * budget + 1e-6
    formats = {Linear.of(n).weight_format for n in ir.gm.graph.nodes if Linear.of(n)}
    assert formats - {"dense"}, "a budget this size fits some quantized layer"
    assert {layer["format"] for layer in plan["layers"].values()} <= {DENSE, *FORMATS}
    assert plan["units"] == len(plan["layers"]) == 5   # per linear at this size


def test_auto_zero_budget_keeps_fp32_and_bigger_budget_is_not_slower():
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    plans = {}
    for budget in (0.0, 0.001, 0.05):
        torch._dynamo.reset()
        _, ir = _compile(model, (ids,), quantize="auto", accuracy_budget={"kl": budget})
        plans[budget] = ir.info["quantize_auto"]
    assert {layer["format"] for layer in plans[0.0]["layers"].values()} == {DENSE}
    total = {b: sum(layer["us"] for layer in p["layers"].values()) for b, p in plans.items()}
    assert total[0.05] <= total[0.001] <= total[0.0]


def test_auto_plan_is_deterministic():
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    plans = []
    for _ in range(2):
        torch._dynamo.reset()
        _, ir = _compile(model, (ids,), quantize="auto", accuracy_budget={"kl": 0.01})
        plans.append({k: v["format"] for k, v in ir.info["quantize_auto"]["layers"].items()})
    assert plans[0] == plans[1]


def test_per_block_units_beyond_the_linear_limit(monkeypatch):
    monkeypatch.setattr(quantize_auto, "MAX_SINGLE_LINEARS", 2)
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    _, ir = _compile(model, (ids,), quantize="auto", accuracy_budget={"kl": 0.01})
    plan = ir.info["quantize_auto"]
    assert plan["units"] == 3   # layers.0, layers.1, head
    for block in ("layers.0", "layers.1"):
        members = [v for k, v in plan["layers"].items() if k.startswith(block + ".")]
        assert len(members) == 2 and len({m["format"] for m in members}) == 1


def test_ppl_and_mse_budgets():
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 32))
    out, ir = _compile(model, (ids,), quantize="auto", accuracy_budget={"ppl": 0.01})
    with torch.no_grad():
        ref = model(ids)
    nll = lambda logits: F.cross_entropy(logits[0, :-1], ids[0, 1:])  # noqa: E731
    assert math.exp(float(nll(out) - nll(ref))) - 1 <= 0.01 * 1.01 + 1e-6

    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(8, 64)
    torch._dynamo.reset()
    out, ir = _compile(mlp, (x,), quantize="auto", accuracy_budget={"mse": 1e-3})
    with torch.no_grad():
        ref = mlp(x)
    assert float(((out - ref) ** 2).sum() / (ref ** 2).sum()) <= 1e-3 * 1.01
    assert ir.info["quantize_auto"]["metric"] == "mse"


def test_kl_on_a_model_without_token_inputs_says_what_to_use(caplog):
    mlp = nn.Sequential(nn.Linear(64, 32)).eval()
    with pytest.raises(Exception, match=r"needs logits \[\.\.\., vocab\] of integer token ids.*'mse'"):
        _compile(mlp, (torch.randn(4, 64),), quantize="auto", accuracy_budget={"kl": 0.01})


def test_explain_shows_the_per_layer_table():
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    with measuring_speed(by_bytes):
        text = str(fxforge.explain(model, (ids,), backend="cpu", quantize="auto",
                                   accuracy_budget={"kl": 0.01}))
    assert "quantize auto: kl budget 0.01, measured" in text
    header = next(line for line in text.splitlines() if "Δ kl" in line)
    assert "us/token" in header and "format" in header
    rows = [line for line in text.splitlines() if "head.weight" in line or "layers.0.up" in line]
    assert len(rows) >= 2 and all(re.search(r"\d", row) for row in rows)


def test_calibration_text_is_the_builtin_real_text():
    def by_char(text):   # a tokenizer called as Hugging Face's are
        return {"input_ids": [ord(c) for c in text]}
    ids = calibration_text(by_char, tokens=600, windows=3)
    assert ids.shape == (3, 200)
    text = "".join(map(chr, ids.flatten().tolist()))
    words = text.split()
    assert len(set(words)) > 20 and sum(w.isalpha() for w in words) > len(words) / 2


def test_layers_and_frontier_csv_round_trip(tmp_path):
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    _, ir = _compile(model, (ids,), quantize="auto", accuracy_budget={"kl": 0.01})
    rows = read_csv(write_layers_csv(ir.info["quantize_auto"], tmp_path / "layers.csv"))
    assert tuple(rows[0]) == LAYER_COLUMNS and len(rows) == 5
    for row in rows:
        layer = ir.info["quantize_auto"]["layers"][row["layer"]]
        assert row["format"] == layer["format"] and row["bytes"] == layer["bytes"]
        assert row["delta"] == pytest.approx(layer["delta"]) and row["K"] * row["N"] > 0
    points = [{"scheme": "fp32", "budget": "", "decode_tok_s": 10.0, "kl_vs_fp32": 0.0},
              {"scheme": "int8", "budget": "", "decode_tok_s": 20.0, "kl_vs_fp32": 0.002},
              {"scheme": "int4:g128", "budget": "", "decode_tok_s": 25.0, "kl_vs_fp32": 0.05},
              {"scheme": "auto kl<=0.01", "budget": 0.01, "decode_tok_s": 24.0, "kl_vs_fp32": 0.008},
              {"scheme": "worse", "budget": "", "decode_tok_s": 19.0, "kl_vs_fp32": 0.01}]
    assert on_frontier(points) == [True, True, True, True, False]
    back = read_csv(write_frontier_csv(points, tmp_path / "frontier.csv"))
    assert [r["on_frontier"] for r in back] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert back[3]["scheme"] == "auto kl<=0.01" and back[3]["decode_tok_s"] == 24.0


def test_aot_artifact_stores_the_formats_and_load_does_not_search(tmp_path, monkeypatch):
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (1, 16))
    with measuring_speed(by_bytes):
        art = fxforge.aot_compile(model, (ids,), tmp_path / "art", backend="cpu",
                                  quantize="auto", accuracy_budget={"kl": 0.02})
    expected = art(ids)

    def no_search(*args, **kwargs):
        raise AssertionError("a load must not search or measure again")
    monkeypatch.setattr(quantize_auto, "auto_formats", no_search)
    monkeypatch.setattr("fxforge.passes.quantize_plan.layer_seconds", no_search)
    loaded = fxforge.load(tmp_path / "art")
    formats = {Linear.of(n).weight_format for n in loaded.ir.gm.graph.nodes if Linear.of(n)}
    assert formats - {"dense"}
    assert loaded.options.accuracy_budget == ("kl", 0.02)
    torch.testing.assert_close(loaded(ids), expected)



