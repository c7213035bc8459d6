"""Chat with the real SmolLM2-135M-Instruct, compiled by fxforge, and time it.

    python -m fxforge.examples.chat_demo            # what `make run` does
    FXFORGE_DEMO_BACKEND=eager python -m fxforge.examples.chat_demo --no-inductor

Steps: load SmolLM2 (~30 s), answer a question greedily with eager PyTorch,
then for the demo backend (fxforge unless ``FXFORGE_DEMO_BACKEND`` says
otherwise) and torch.compile's default (inductor): compile the model's
``forward``, answer again with ``model.generate`` (HF's ``DynamicCache``),
compare its logits with eager's, and time prefill and decode. With the fxforge
backend, also ``fxforge+kv``: the plain no-cache loop (``fxforge.generate`` on a
logits-only wrapper) compiled with ``options={"kv_cache": True}``, where
fxforge's KV-cache pass and replayed decode steps do the caching.

Everything goes through ``generate`` so each backend compiles only the graphs
real generation needs: the prompt (prefill) graph, then the decode graph
(static for the first step, dynamic in the cache length from the second).
Prefill is timed as ``generate(max_new_tokens=1)``: one prompt forward plus a
negligible argmax. The logits checked are the prompt's next-token logits and
those of every decode step while the greedy tokens still agree with eager.

Exit code 1 when the demo backend fails or its logits differ from eager's by
more than ``--tol`` relative to the largest eager logit.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Optional

import torch

from fxforge.examples.smollm2 import DEFAULT_QUESTION, chat_prompt, gguf_path, load_smollm2, smollm2_status


@dataclasses.dataclass
class Run:
    """What one backend produced: answer, accuracy vs eager, timings."""

    backend: str
    answer: str = ""
    compile_s: float = 0.0
    prompt_diff: float = 0.0  # max |logits - eager| on the prompt's next-token logits
    decode_diff: float = 0.0  # same, over the decode steps where greedy tokens agree
    rel_diff: float = 0.0  # the larger of the two, over max |eager logit|
    prefill_ms: float = float("nan")
    decode_tok_s: float = float("nan")
    error: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default=os.environ.get("FXFORGE_DEMO_BACKEND", "fxforge"),
                   help="torch.compile backend under test (env FXFORGE_DEMO_BACKEND, default fxforge)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode timing run")
    p.add_argument("--prefill-runs", type=int, default=7, help="timed generate(max_new_tokens=1) calls (median reported)")
    p.add_argument("--decode-runs", type=int, default=3, help="timed generate calls (median reported)")
    p.add_argument("--no-inductor", action="store_true", help="skip the torch.compile default backend")
    p.add_argument("--tol", type=float, default=1e-3, help="max |compiled - eager| / max |eager| on the logits")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--gguf", action="store_true", help="also fxforge+kv running the GGUF file's own "
                   "Q4_1/Q8_0 blocks (quantize='gguf:PATH': the same weights, a quarter of the bytes)")
    return p.parse_args(argv)


def resolve_backend(name: str):
    """A ``torch.compile`` backend: a registered name, or fxforge's function if not installed."""
    import torch._dynamo

    if name in torch._dynamo.list_backends(exclude_tags=()):
        return name
    if name == "fxforge":
        from fxforge.backend_entry import fxforge_backend

        return fxforge_backend
    raise ValueError(f"unknown torch.compile backend {name!r}")


@contextlib.contextmanager
def compiled_forward(model, backend):
    """Swap ``model.forward`` for a compiled one, so ``model(...)`` and ``generate`` use it."""
    import torch._dynamo

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        yield
    finally:
        del model.forward  # the instance attribute; the class method shows through again
        torch._dynamo.reset()


def generate(model, tokenizer, ids: torch.Tensor, new_tokens: int, exact: bool = False, logits: bool = False):
    """Greedy generation with HF's DynamicCache.

    ``exact`` forces ``new_tokens`` tokens (EOS suppressed) for timing;
    ``logits`` returns a ``GenerateOutput`` with the raw per-step logits.
    """
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else 0,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.eos_token_id,
        output_logits=logits,
        return_dict_in_generate=logits,
    )


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(run: Run, out, reference) -> None:
    """Fill the logits diffs of ``run`` from its ``generate`` output vs eager's."""
    new, ref_new = out.sequences[0, -len(out.logits):], reference.sequences[0, -len(reference.logits):]
    run.prompt_diff = (out.logits[0] - reference.logits[0]).abs().max().item()
    scale = reference.logits[0].abs().max().item()
    agree = 0  # decode step k is comparable while all tokens before it agree
    while agree < min(len(new), len(ref_new)) and new[agree] == ref_new[agree]:
        agree += 1
    steps = range(1, min(agree + 1, len(out.logits), len(reference.logits)))
    run.decode_diff = max(((out.logits[k] - reference.logits[k]).abs().max().item() for k in steps), default=0.0)
    run.rel_diff = max(run.prompt_diff, run.decode_diff) / scale


def measure(model, tokenizer, ids, args, run: Run, reference=None):
    """Fill ``run`` (answer, diffs, timings) for whatever ``model.forward`` is now.

    Returns the ``generate`` output of the answer, the reference for later runs.
    """
    t0 = time.perf_counter()
    out = generate(model, tokenizer, ids, args.new_tokens, logits=True)  # compiles prefill + decode graphs
    run.compile_s = time.perf_counter() - t0
    run.answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if reference is not None:
        compare(run, out, reference)
    prefill = median_seconds(lambda: generate(model, tokenizer, ids, 1), args.prefill_runs)
    run.prefill_ms = 1e3 * prefill
    decode = median_seconds(lambda: generate(model, tokenizer, ids, args.new_tokens, exact=True), args.decode_runs)
    run.decode_tok_s = args.new_tokens / decode
    return out


def print_table(runs: list[Run], prompt_len: int, new_tokens: int) -> None:
    eager = runs[0]
    print(f"\nSpeed (prefill: {prompt_len}-token prompt, median; "
          f"decode: {new_tokens} new tokens with a KV cache, prefill included, median; HF's "
          "DynamicCache, or fxforge's own for fxforge+kv)")
    head = f"{'backend':<14}{'prefill ms':>12}{'vs eager':>10}{'decode tok/s':>14}{'vs eager':>10}{'compile s':>11}{'max|diff|':>11}"
    print(head)
    print("-" * len(head))
    for r in runs:
        if r.error:
            print(f"{r.backend:<14}  FAILED: {r.error.splitlines()[0][:100]}")
            continue
        pre_x = eager.prefill_ms / r.prefill_ms
        dec_x = r.decode_tok_s / eager.decode_tok_s
        comp = "-" if r is eager else f"{r.compile_s:.1f}"
        diff = "-" if r is eager else f"{max(r.prompt_diff, r.decode_diff):.1e}"
        print(f"{r.backend:<14}{r.prefill_ms:>12.1f}{pre_x:>9.2f}x{r.decode_tok_s:>14.1f}{dec_x:>9.2f}x{comp:>11}{diff:>11}")


def run_backend(name: str, backend, model, tokenizer, ids, args, reference) -> Run:
    run = Run(name)
    print(f"\n[{name}] compiling and checking ...", flush=True)
    try:
        with torch.inference_mode(), compiled_forward(model, backend):
            measure(model, tokenizer, ids, args, run, reference)
    except Exception as exc:  # report, and let main decide whether it is fatal
        run.error = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {run.error[:500]}", flush=True)
        return run
    verdict = "OK" if run.rel_diff <= args.tol else "MISMATCH"
    print(f"[{name}] compile + first answer {run.compile_s:.1f} s; logits max|diff| vs eager: "
          f"prompt {run.prompt_diff:.2e}, decode {run.decode_diff:.2e} "
          f"(relative {run.rel_diff:.1e}, tol {args.tol:.0e}): {verdict}")
    print(f"[{name}] answer: {run.answer!r}", flush=True)
    return run


def run_fxforge_kv(model, tokenizer, ids, args, reference, label: str = "fxforge+kv",
                   options: Optional[dict] = None) -> Run:
    """The no-cache loop made incremental by fxforge (``kv_cache=True``, plus ``options``),
    timed like the others."""
    import torch._dynamo

    import fxforge
    from fxforge.examples.hf_models import LogitsOnly

    run = Run(label)
    print(f"\n[{run.backend}] compiling and checking ...", flush=True)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            compiled = torch.compile(LogitsOnly(model), backend=resolve_backend("fxforge"),
                                     options={"kv_cache": True, "max_seq_len": 512, **(options or {})})
            t0 = time.perf_counter()
            # transformers' wrappers only set and reset context state per call: decode steps may
            # skip dynamo (fxforge/direct_steps.py)
            out = fxforge.generate(compiled, ids, args.new_tokens, stop_tokens=tokenizer.eos_token_id,
                                   direct_steps=True)
            run.compile_s = time.perf_counter() - t0
            run.answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            run.prompt_diff = (compiled(ids)[0, -1] - reference.logits[0][0]).abs().max().item()
            run.rel_diff = run.prompt_diff / reference.logits[0].abs().max().item()
            run.prefill_ms = 1e3 * median_seconds(lambda: fxforge.generate(compiled, ids, 1),
                                                  args.prefill_runs)
            decode = median_seconds(lambda: fxforge.generate(compiled, ids, args.new_tokens,
                                                             direct_steps=True),
                                    args.decode_runs)
            run.decode_tok_s = args.new_tokens / decode
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        print(f"[{run.backend}] FAILED: {run.error[:500]}", flush=True)
    finally:
        torch._dynamo.reset()
    if not run.error:
        print(f"[{run.backend}] compile + first answer {run.compile_s:.1f} s; prompt logits "
              f"max|diff| vs eager {run.prompt_diff:.2e}; answer: {run.answer!r}", flush=True)
    return run


def warn_if_busy() -> None:
    """Timings are meaningless when other processes compete for the cores: with
    every core's OpenMP thread in a barrier, one descheduled thread stalls all."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        hint = " (try --threads 1)" if torch.get_num_threads() > 1 else ""
        print(f"WARNING: load average {load:.1f} on {cores} cores: other work is running, timings will be noisy{hint}")


def main(argv=None) -> int:
    args = parse_args(argv)
    ok, reason = smollm2_status()
    if not ok:
        print(f"SmolLM2 is not available: {reason}", file=sys.stderr)
        return 1
    try:
        demo_backend = resolve_backend(args.backend)
    except (ImportError, ValueError) as exc:
        print(f"backend {args.backend!r} unavailable ({exc}); set FXFORGE_DEMO_BACKEND=eager to try the demo",
              file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; demo backend: {args.backend}")
    warn_if_busy()
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(progress=False)
    ids = chat_prompt(tokenizer, args.question)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s; prompt {ids.shape[1]} tokens")
    print(f"Q: {args.question}")

    eager = Run("eager")
    with torch.inference_mode():
        reference = measure(model, tokenizer, ids, args, eager)
    print(f"[eager] answer: {eager.answer!r}", flush=True)

    # "eager" as a torch.compile backend means dynamo capture + eager replay.
    demo_name = "dynamo+eager" if args.backend == "eager" else args.backend
    demo = run_backend(demo_name, demo_backend, model, tokenizer, ids, args, reference)  # first: fail fast
    runs = [eager]
    if not args.no_inductor:
        runs.append(run_backend("inductor", "inductor", model, tokenizer, ids, args, reference))
    runs.append(demo)
    kv = run_fxforge_kv(model, tokenizer, ids, args, reference) if args.backend == "fxforge" else None
    if kv is not None:
        runs.append(kv)
    gguf = None
    if args.gguf and args.backend == "fxforge":
        gguf = run_fxforge_kv(model, tokenizer, ids, args, reference, "fxforge+kv+gguf",
                              {"quantize": f"gguf:{gguf_path()}"})
        runs.append(gguf)
    print_table(runs, ids.shape[1], args.new_tokens)

    status = 0
    if "paris" not in eager.answer.lower():
        print("\nWARNING: the eager answer does not mention Paris")
    for r in runs[1:]:
        if not r.error and r.answer != eager.answer:
            print(f"\nWARNING: {r.backend} answered differently from eager")
    for checked in [demo] + [r for r in (kv, gguf) if r is not None]:
        if checked.error or checked.rel_diff > args.tol:
            why = checked.error or f"relative logits diff {checked.rel_diff:.2e} > {args.tol:.0e}"
            print(f"\nFAIL: backend {checked.backend}: {why}", file=sys.stderr)
            status = 1
        else:
            print(f"\nPASS: {checked.backend} matches eager (logits; the answer is compared above)")
    return status


if __name__ == "__main__":
    sys.exit(main())
