"""Tensor parallelism across processes, as users launch it: ``torchrun --nproc-per-node 2``,
gloo on loopback (``tp_ranks.py`` is each rank; it writes what it measured, checked here)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("tp_ranks.py")
FP32 = dict(rtol=1.3e-5, atol=1e-5)   # compiler.TOLERANCES[float32]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                             f"{done.stderr[-8000:]}")


def _torchrun(phase: str, out: Path) -> list[dict]:
    _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(_free_port()), str(WORKER), phase, str(out)], out)
    return [json.loads((out / f"{phase}.rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tensor_parallel")
    compiled = _torchrun("compile", out)
    loaded = _torchrun("load", out)
    _run([str(WORKER), "single", str(out)], out)
    return {"compile": compiled, "load": loaded,
            "single": json.loads((out / "single.json").read_text())}


def _close(diff: float, scale: float) -> bool:
    return diff <= FP32["atol"] + FP32["rtol"] * scale


@pytest.mark.parametrize("model", ["small_gpt", "llama", "qwen2"])
def test_two_ranks_give_eager_logits_and_greedy_tokens_through_the_kv_cache(runs, model):
    ranks = [r[model] for r in runs["compile"]]
    for rank in ranks:
        assert _close(rank["max_diff_vs_eager"], rank["eager_scale"]), rank["max_diff_vs_eager"]
        assert rank["tokens"] == rank["eager_tokens"]
        report = rank["report"]
        assert len(report["attention"]) == 2 and len(report["mlp"]) == 2, report
        assert report["embeddings"] and report["lm_heads"] and not report["replicated"]
        assert report["bytes_after"] <= 0.55 * report["bytes_before"], report
        # the KV cache holds this rank's heads: half of the small GPT's 4, one of 2 kv heads
        assert rank["cache_heads"] == [2 if model == "small_gpt" else 1]
    # every rank decodes the same tokens, sampled ones included (one seed for all)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] and ranks[0]["sampled"] == ranks[1]["sampled"]


@pytest.mark.parametrize("scheme", ["int4:g32", "int8"])
def test_quantized_shards_match_the_format_compiled_in_one_process(runs, scheme):
    for rank in (r[f"llama {scheme}"] for r in runs["compile"]):
        # the same codes as one process: int4 groups of 32 inputs lie within a shard, and a
        # row-parallel shard's int8 scales are its whole rows'; fp32 reassociation only
        assert _close(rank["max_diff_vs_single_process"], rank["eager_scale"])
        assert rank["tokens"] == rank["single_process_tokens"] == rank["eager_tokens"]


def test_a_model_that_does_not_split_is_an_error_on_every_rank(runs):
    for rank in runs["compile"]:
        assert rank["uneven"].startswith("TensorParallelError: attention ")
        assert "3 key/value heads (6 query heads) cannot be split evenly over 2 ranks" in rank["uneven"]


def test_explain_shows_the_collectives(runs):
    text = runs["compile"][0]["explain"]
    assert "all_reduce" in text and "all_gather" in text


def test_each_rank_loads_only_its_shard_of_the_artifact_set(runs):
    single = runs["single"]
    assert _close(single["max_diff_vs_eager"], 1.0) and single["tokens"] == single["eager_tokens"]
    for rank, result in enumerate(runs["load"]):
        assert result["folder"].endswith(f"rank{rank}")
        assert result["manifest"]["world_size"] == 2 and result["manifest"]["rank"] == rank
        assert _close(result["max_diff_vs_eager"], 1.0)
        assert result["tokens"] == result["eager_tokens"]
        # weights per rank: about half the file, and the process grows by about that much less
        assert result["weights_file"] <= 0.55 * single["weights_file"]
        saved = single["weights_file"] - result["weights_file"]
        assert single["rss_growth"] - result["rss_growth"] >= 0.75 * saved, (result, single)
        assert "TensorParallelError" in result["wrong_rank"]
        assert f"holds rank {1 - rank}'s shard" in result["wrong_rank"]
