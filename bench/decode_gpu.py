"""Batch-1 decode on a CUDA GPU (issue 5): a Llama-style ~1B bf16 model, tokens/s and the
fraction of the HBM-bandwidth limit it reaches.

    python bench/decode_gpu.py [--layers 22] [--new-tokens 128] [--rounds 3] [--skip "hf + inductor static"]

The model is a TinyLlama-shaped ``LlamaForCausalLM`` (hidden 2048, 22 layers, 32 query / 4 KV
heads, MLP 5632, vocab 32000: 1.1B parameters) with random bf16 weights. Runners as in
``bench/generate.py``: Hugging Face ``generate()`` eager, the same with a static cache and the
forward compiled by ``torch.compile`` (default mode), and
``fxforge.generate`` over the plain no-cache forward compiled with ``kv_cache=True`` (decode steps
captured as CUDA graphs). Every runner must produce the eager tokens.

The bandwidth limit is the device's measured copy bandwidth (bytes read + written per second of a
large device-to-device copy) over the bytes one token reads (weights, the embedding as one row,
plus the K/V cache at the mid-decode position): tokens/s / limit is the fraction reached.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

import fxforge
from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly

from decode_budget import bytes_per_token  # bench/ is on sys.path when run as a script
from generate import decode_rate, hf_runners, same_tokens
from gpu_kernels import copy_bandwidth


def llama_1b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def runners(model, prompt, max_seq_len: int, skip: set[str]) -> dict:
    # mode="reduce-overhead" (CUDA graphs) for the inductor runner failed under generate() with
    # transformers 5.17 on torch 2.11 ("accessing tensor output of CUDAGraphs that has been
    # overwritten"): it runs inductor's default mode.
    out = hf_runners(model, prompt, static="hf + inductor static" not in skip)
    fx = torch.compile(LogitsOnly(model), backend="fxforge",
                       options={"kv_cache": True, "max_seq_len": max_seq_len})
    out["fxforge kv_cache"] = lambda n: fxforge.generate(fx, prompt, n)
    return {k: v for k, v in out.items() if k not in skip}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", default="", help="runners to leave out (comma-separated)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--verbose", action="store_true", help="fxforge's INFO log (passes, fallbacks)")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("fxforge").setLevel(logging.INFO)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    model = llama_1b(args.layers)
    prompt = torch.randint(3, 30000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    params = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth(torch.empty(2 ** 30, dtype=torch.uint8, device="cuda"))
    nbytes = bytes_per_token(model, args.prompt + args.new_tokens // 2)
    limit = bandwidth / nbytes
    print(f"{torch.cuda.get_device_name()}: Llama {params / 1e9:.2f}B bf16, batch 1, prompt "
          f"{args.prompt}, {args.new_tokens} new tokens, greedy; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; {nbytes / 1e9:.3f} GB per token -> limit {limit:.0f} tok/s",
          flush=True)
    rates, reference, results = {}, None, {}
    with torch.no_grad(), recording() as graphs:
        for label, fn in runners(model, prompt, args.prompt + args.new_tokens + 8,
                                 set(filter(None, args.skip.split(",")))).items():
            try:
                rate, out = decode_rate(fn, args.new_tokens, args.rounds)
            except Exception as exc:  # noqa: BLE001  (a runner that fails is reported, not fatal)
                print(f"  {label:<22} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            same = same_tokens(out, reference, args.prompt, label)
            reference = out if reference is None else reference
            rates[label] = rate
            results[label] = {"tok_s": rate, "fraction_of_limit": rate / limit, "same_tokens": same}
            print(f"  {label:<22} {rate:8.1f} tok/s = {rate / limit:5.1%} of the bandwidth limit  "
                  f"{'same tokens' if same else 'DIFFERENT TOKENS'}", flush=True)
    decoders = [g.kv for g in graphs if g.kv is not None]
    if not decoders:
        print("  fxforge: no graph got a KV cache (--verbose says why)")
    for decoder in decoders:
        replays = [state.replay for state in decoder.states()]
        print(f"  fxforge decoder: {decoder.stats}; replay per state: " + ", ".join(
            'none' if r is None else r.off or 'on, validated' if r.validated else 'on'
            for r in replays))
    base = rates.get("hf eager")
    if base:
        print("  " + ", ".join(f"{k} {v / base:.2f}x eager" for k, v in rates.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "params": params,
                       "bytes_per_token": nbytes, "copy_bandwidth": bandwidth,
                       "limit_tok_s": limit, "runners": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
