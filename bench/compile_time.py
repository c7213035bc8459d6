"""Compile time, cold and warm, fxforge next to torch.compile's default (Inductor), in one run.

Each measurement is its own process, so nothing of an earlier compile stays in memory: a
workload's model is built (not timed), then compiled and run once (timed: "compile plus first
call"). Cold: fresh cache folders (fxforge's kernel, tuning and graph caches, Inductor's FX-graph
and AOTAutograd caches, Triton's); warm: a second process on the folders the cold one filled
(fxforge's graph cache then hands it the optimized graph: no aot_autograd, no pass).
Workloads:

  * ``small_gpt``: the small GPT's prefill (32 tokens);
  * ``hf:<arch>``: a tiny random-weight transformers model from its config (16 tokens);
  * ``smollm2``: SmolLM2-135M's prefill (64 tokens, real weights);
  * ``smollm2-answer``: SmolLM2 answering a chat prompt: the prompt, then ``--new-tokens``
    tokens (fxforge: ``fxforge.generate`` with ``kv_cache=True``; Inductor: transformers'
    ``generate`` with the forward compiled), the time to the last token.

For fxforge each process also reports its own share (building the IR, freezing, passes, the KV
step, lowering and the graph cache's lookup and store, from the compile profile,
``irgraph/compile_profile.py``) of every graph it compiled.

    python bench/compile_time.py [--workloads small_gpt,hf:llama,smollm2,smollm2-answer]
                                 [--backends fxforge,inductor] [--threads 2] [--new-tokens 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OWN_PHASES = ("capture: build IR", "freeze", "passes", "kv step", "lower", "graph cache: lookup",
              "graph cache: store")
DEFAULT_WORKLOADS = "small_gpt,hf:gpt2,hf:llama,hf:bert,smollm2,smollm2-answer"


def _workload(name: str):
    """(model, inputs, runs): ``runs(model, backend)`` compiles and runs it once."""
    import torch
    if name == "small_gpt":
        from fxforge.examples.small_gpt import example_inputs, make_model
        return _prefill(make_model().eval(), example_inputs(seq=32))
    if name.startswith("hf:"):
        from fxforge.examples.hf_models import LogitsOnly, build, example_inputs
        arch = name[3:]
        return _prefill(LogitsOnly(build(arch)), example_inputs(arch, batch=1, seq=16))
    from fxforge.examples.hf_models import LogitsOnly
    from fxforge.examples.smollm2 import load_smollm2
    model, tokenizer = load_smollm2(progress=False)
    model = model.eval()
    ids = torch.randint(3, 30000, (1, 64), generator=torch.Generator().manual_seed(0))
    if name == "smollm2":
        return _prefill(LogitsOnly(model), (ids,))
    if name == "smollm2-answer":
        return lambda backend, new_tokens: _answer(model, tokenizer, backend, new_tokens)
    raise SystemExit(f"unknown workload {name!r}")


def _prefill(module, inputs):
    def run(backend: str, new_tokens: int) -> None:
        import torch
        import fxforge
        compiled = fxforge.compile(module) if backend == "fxforge" else torch.compile(module)
        with torch.no_grad():
            compiled(*inputs)
    return run


def _answer(model, tokenizer, backend: str, new_tokens: int) -> None:
    import torch
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                             "France?"}], add_generation_prompt=True,
                                           return_tensors="pt")
    ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    with torch.inference_mode():
        if backend == "fxforge":
            import fxforge
            from fxforge.examples.hf_models import LogitsOnly
            compiled = fxforge.compile(LogitsOnly(model), kv_cache=True, max_seq_len=256)
            fxforge.generate(compiled, ids, new_tokens)
        else:
            model.forward = torch.compile(model.forward)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)


def child(workload: str, backend: str, threads: int, new_tokens: int) -> dict:
    """One measurement, in this process (run by the parent through ``--child``)."""
    import torch
    torch.set_num_threads(threads)
    run = _workload(workload)
    from fxforge.compiler import recording
    start = time.perf_counter()
    with recording() as graphs:
        run(backend, new_tokens)
    seconds = time.perf_counter() - start
    own = sum(g.profile.seconds(p) for g in graphs if g.profile is not None for p in OWN_PHASES)
    capture = sum(g.profile.seconds(p) for g in graphs if g.profile is not None
                  for p in ("capture: dynamo tracing", "capture: aot_autograd"))
    return {"seconds": seconds, "graphs": len(graphs), "own": own, "capture": capture}


def measure(workload: str, backend: str, caches: Path, args) -> dict:
    env = {**os.environ, "FXFORGE_CACHE_DIR": str(caches / "fxforge"),
           "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
           "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONSAFEPATH": "1"}
    env.pop("FXFORGE_PROFILE", None)
    cmd = [sys.executable, __file__, "--child", workload, backend, "--threads",
           str(args.threads), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    p.add_argument("--backends", default="fxforge,inductor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.threads, args.new_tokens)), flush=True)
        return 0
    from fxforge.kernels.cpu_isa import cpu_features
    print(f"Compile time; {cpu_features().describe()}; {args.threads} threads; each figure one "
          "process (compile plus first call; cold: fresh caches, warm: the cold run's caches)\n")
    print("| workload | backend | cold s | warm s | graphs | fxforge's own, cold / warm s "
          "| capture (dynamo + aot), cold / warm s |")
    print("|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory(prefix="fxforge-compile-time-") as tmp:
                cold = measure(workload, backend, Path(tmp), args)
                warm = measure(workload, backend, Path(tmp), args) if "error" not in cold else cold
            if "error" in cold or "error" in warm:
                print(f"| {workload} | {backend} | {cold.get('error') or warm.get('error')} |",
                      flush=True)
                continue
            own = (f"{cold['own']:.1f} / {warm['own']:.1f}" if backend == "fxforge" else "-")
            capture = (f"{cold['capture']:.1f} / {warm['capture']:.1f}"
                       if backend == "fxforge" else "-")
            print(f"| {workload} | {backend} | {cold['seconds']:.1f} | {warm['seconds']:.1f} "
                  f"| {cold['graphs'] if backend == 'fxforge' else '-'} | {own} | {capture} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
