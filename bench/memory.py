"""Resident memory of a compiled decoder: what fxforge adds on top of the model.

    python bench/memory.py [--model smollm2|llama|gpt2] [--new-tokens 8]

Each configuration runs in a fresh process (RSS only grows within one): load the model, note
the resident set, then run greedy generation of ``--new-tokens`` tokens and note it again; both
after ``malloc_trim`` (the heap glibc keeps free for reuse is not counted).
  * ``eager``: ``fxforge.generate`` on the model itself (the no-cache loop, nothing compiled);
  * ``fxforge``: on ``torch.compile(..., backend="fxforge")``: dynamo compiles a static graph,
    then a dynamic one when the length changes (two lowerings of the same weights);
  * ``fxforge kv_cache``: ``options={"kv_cache": True}``: the plain and the decode-step graph;
  * ``fxforge kv_cache bf16``: the same with ``precision="bf16"`` (weights stored in bf16).
The packed weights the kernels read are the floor of what compiling adds: the table shows the
model's linear weights in fp32 beside the growth.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = {"eager": None, "fxforge": {}, "fxforge kv_cache": {"kv_cache": True},
           "fxforge kv_cache bf16": {"kv_cache": True, "precision": "bf16"}}


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(model_name: str, config: str, new_tokens: int) -> dict:
    """Runs in the child process."""
    import gc

    import torch

    import fxforge
    from fxforge.orchestrate import return_freed_memory
    from fxforge.examples.hf_models import LogitsOnly
    if model_name == "smollm2":
        from fxforge.examples.smollm2 import load_smollm2
        model = load_smollm2(progress=False)[0].eval()
    else:
        from fxforge.examples.hf_models import build_bench
        model = build_bench(model_name).eval()
    linear_mb = sum(m.weight.numel() * 4 for m in model.modules()
                    if isinstance(m, torch.nn.Linear)) / 2**20
    ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    gc.collect()
    return_freed_memory()
    loaded = _rss_mb()
    options = CONFIGS[config]
    with torch.inference_mode():
        runner = LogitsOnly(model)
        if options is not None:
            runner = torch.compile(runner, backend="fxforge", options={"max_seq_len": 256, **options}
                                   if options.get("kv_cache") else options)
        fxforge.generate(runner, ids, new_tokens)
    gc.collect()
    return_freed_memory()   # what the process holds, not what glibc keeps free for reuse
    return {"loaded": loaded, "after": _rss_mb(), "linear_mb": linear_mb}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.new_tokens)))
        return 0
    rows = {}
    for config in CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--new-tokens",
                               str(args.new_tokens), "--child", config],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{config}: failed\n{done.stderr[-2000:]}")
            return 1
        rows[config] = json.loads(done.stdout.strip().splitlines()[-1])
    linear_mb = rows["eager"]["linear_mb"]
    print(f"{args.model}: resident memory (MB) after loading and after generating "
          f"{args.new_tokens} tokens; linear weights {linear_mb:.0f} MB in fp32")
    print(f"  {'configuration':<24}{'loaded':>9}{'after':>9}{'growth':>9}")
    for config, row in rows.items():
        print(f"  {config:<24}{row['loaded']:>9.0f}{row['after']:>9.0f}"
              f"{row['after'] - row['loaded']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
