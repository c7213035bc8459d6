"""One rank of the tensor-parallel tests (``tests/fxforge/test_tensor_parallel_ranks.py``
launches it with ``torchrun --nproc-per-node 2``): each phase writes what it measured to
``<out>/<phase>.rank<r>.json`` for the test to check; nothing is asserted here.

* ``compile``: per model (the small GPT with an odd vocabulary, tiny Llama and Qwen2), the
  logits of the tensor-parallel compile against this process's own eager run of the whole
  model, greedy tokens through ``kv_cache`` against eager ``generate``, sampled tokens (every
  rank must agree), the quantized formats against a single-process compile of the same format,
  and an AOT compile of a larger Llama (a set of per-rank artifacts) and, on rank 0, of the
  same model without tensor parallelism;
* ``load``: each rank loads its artifact from the set, measuring its memory, and decodes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fxforge
from fxforge.compiler import recording
from fxforge.examples import hf_models
from fxforge.examples.small_gpt import GPTConfig, SmallGPT

PROMPT = torch.randint(3, 400, (1, 10), generator=torch.Generator().manual_seed(7))
NEW_TOKENS = 8
# large enough that its weights (~90 MB fp32) dominate what a load adds to a process
BIG_LLAMA = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=1024, num_hidden_layers=2, vocab_size=40000)
SEQ = torch.export.Dim("seq", min=2, max=64)


def model_for(name: str) -> torch.nn.Module:
    if name == "small_gpt":
        torch.manual_seed(0)
        return SmallGPT(GPTConfig(vocab_size=401, block_size=64, n_layer=2, n_head=4,
                                  n_embd=64)).eval()
    if name == "big_llama":
        return hf_models.LogitsOnly(hf_models.build("llama", **BIG_LLAMA))
    return hf_models.LogitsOnly(hf_models.build(name))


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _report(graphs: list) -> dict:
    found = [g.ir.info["tensor_parallel"] for g in graphs if "tensor_parallel" in g.ir.info]
    return {k: v for k, v in found[0].items() if k != "replicated"} | \
        {"replicated": sorted(found[0]["replicated"])} if found else {}


def check_model(name: str, **options) -> dict:
    model = model_for(name)
    with torch.no_grad():
        eager = model(PROMPT)
    eager_tokens = fxforge.generate(model, PROMPT, NEW_TOKENS)
    reference = None
    if options.get("quantize"):   # the same format compiled in one process, whole
        reference = fxforge.compile(model_for(name), **options)
    with recording() as graphs:
        compiled = fxforge.compile(model, tensor_parallel=True, kv_cache=True, **options)
        logits = compiled(PROMPT)
    tokens = fxforge.generate(compiled, PROMPT, NEW_TOKENS)
    sampled = fxforge.generate(compiled, PROMPT, NEW_TOKENS, temperature=1.0, top_k=50)
    result = {"max_diff_vs_eager": (logits - eager).abs().max().item(),
              "eager_scale": eager.abs().max().item(),
              "tokens": tokens.tolist(), "eager_tokens": eager_tokens.tolist(),
              "sampled": sampled.tolist(), "report": _report(graphs),
              "cache_heads": sorted({c.heads for g in graphs if g.kv is not None
                                     for c in g.kv.plan.caches})}
    if reference is not None:
        with torch.no_grad():
            single = reference(PROMPT)
        result["max_diff_vs_single_process"] = (logits - single).abs().max().item()
        result["single_process_vs_eager"] = (single - eager).abs().max().item()
        result["single_process_tokens"] = fxforge.generate(reference, PROMPT, NEW_TOKENS).tolist()
    return result


def phase_compile(out: Path) -> dict:
    results = {name: check_model(name) for name in ("small_gpt", "llama", "qwen2")}
    for scheme in ("int4:g32", "int8"):
        results[f"llama {scheme}"] = check_model("llama", quantize=scheme)
    uneven = hf_models.LogitsOnly(hf_models.build("llama", num_attention_heads=6,
                                                  num_key_value_heads=3, hidden_size=96))
    try:   # the pass's error reaches the caller: no eager fallback, no dynamo traceback
        fxforge.compile(uneven, tensor_parallel=True)(PROMPT)
        results["uneven"] = "compiled"
    except fxforge.FxforgeError as exc:
        results["uneven"] = f"{type(exc).__name__}: {exc}"
    explained = fxforge.explain(model_for("qwen2"), (PROMPT,), tensor_parallel=True)
    results["explain"] = str(explained)
    model = model_for("big_llama")
    fxforge.aot_compile(model, (PROMPT,), out / "set", dynamic_shapes=({1: SEQ},),
                        tensor_parallel=True, kv_cache=True)
    if dist.get_rank() == 0:
        fxforge.aot_compile(model, (PROMPT,), out / "single", dynamic_shapes=({1: SEQ},),
                            kv_cache=True)
        with torch.no_grad():
            torch.save({"logits": model(PROMPT),
                        "tokens": fxforge.generate(model, PROMPT, NEW_TOKENS)}, out / "big.pt")
    dist.barrier()
    return results


def load_and_decode(path: Path) -> dict:
    wrong = None
    if path.name == "set":   # another rank's folder is refused before anything is read
        try:
            fxforge.load(path / f"rank{1 - dist.get_rank()}")
        except fxforge.FxforgeError as exc:
            wrong = f"{type(exc).__name__}: {exc}"
    before = rss_bytes()
    artifact = fxforge.load(path)
    with torch.no_grad():
        logits = artifact(PROMPT)
    grown = rss_bytes() - before
    expected = torch.load(path.parent / "big.pt")
    tokens = fxforge.generate(artifact, PROMPT, NEW_TOKENS)
    return {"rss_growth": grown, "folder": str(artifact.path),
            "manifest": artifact.manifest.get("tensor_parallel"),
            "weights_file": (artifact.path / "weights.safetensors").stat().st_size,
            "max_diff_vs_eager": (logits - expected["logits"]).abs().max().item(),
            "tokens": tokens.tolist(), "eager_tokens": expected["tokens"].tolist(),
            "wrong_rank": wrong}


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    if phase == "single":   # one plain process: the whole model's artifact
        result = load_and_decode(out / "single")
        (out / "single.json").write_text(json.dumps(result))
        return
    dist.init_process_group("gloo")
    try:
        result = phase_compile(out) if phase == "compile" else load_and_decode(out / "set")
        (out / f"{phase}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
