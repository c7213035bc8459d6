"""The real SmolLM2-135M-Instruct answers a question with its weights split over ranks.

    torchrun --nproc-per-node 3 -m fxforge.examples.tensor_parallel
    torchrun --nproc-per-node 3 -m fxforge.examples.tensor_parallel --quantize int8

SmolLM2 has 3 key/value heads (9 query heads), so it splits over 3 ranks (or 9); at 2 ranks
fxforge says why it cannot. Every rank loads the model, compiles it with
``tensor_parallel=True`` and the KV cache (gloo on CPUs, NCCL where each rank has a GPU) and
decodes greedily with ``fxforge.generate``; rank 0 prints the answer, each rank's weight bytes
against the whole model's, and whether the tokens equal eager PyTorch's on one process.
Exit code 1 if any rank's tokens differ.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import fxforge
from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly
from fxforge.examples.smollm2 import DEFAULT_QUESTION, chat_prompt, load_smollm2


def _weights_report(graphs: list) -> dict:
    for graph in graphs:
        if "tensor_parallel" in graph.ir.info:
            return graph.ir.info["tensor_parallel"]
    return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--quantize", default=None, help="weight-only format: int8, int4:g32")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        model, tokenizer = load_smollm2(progress=False)
        ids = chat_prompt(tokenizer, args.question)
        model = LogitsOnly(model)
        stop = tokenizer.eos_token_id
        expected = fxforge.generate(model, ids, args.new_tokens, stop_tokens=stop)   # eager, whole
        try:
            with recording() as graphs:
                compiled = fxforge.compile(model, tensor_parallel=True,
                                           kv_cache=True, quantize=args.quantize)
                tokens = fxforge.generate(compiled, ids, args.new_tokens, stop_tokens=stop)
        except fxforge.FxforgeError as exc:
            if rank == 0:
                print(f"fxforge: {exc}", file=sys.stderr)
            return 2
        report = _weights_report(graphs)
        same = torch.tensor([int(torch.equal(tokens, expected))])
        dist.all_reduce(same)   # how many ranks decoded eager's tokens
        if rank == 0:
            answer = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
            print(f"answer ({dist.get_world_size()} ranks): {answer.strip()}")
            print(f"weights per rank: {report.get('bytes_after', 0) / 2**20:.1f} MiB of "
                  f"{report.get('bytes_before', 0) / 2**20:.1f} MiB (rank 0)")
            print(f"ranks whose tokens equal eager's: {int(same)} of {dist.get_world_size()}")
        return 0 if int(same) == dist.get_world_size() else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
