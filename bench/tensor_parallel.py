"""Tensor parallelism over gloo: per-rank memory, bytes per token, tokens and collective time.

    python bench/tensor_parallel.py [--world-sizes 1,2] [--formats fp32,int8] [--new-tokens 32]
                                    [--json PATH]

A seeded random-weight Llama-like model (hidden 512, 8 heads, 4 KV heads, MLP 2048, 8 layers,
vocabulary 32768: ~65M parameters, ~260 MB in fp32; ``--hidden``, ``--layers``, ``--vocab``,
``--intermediate`` change it) in each format (``fp32``; ``int8``: weight-only
``quantize="int8"``), at each world size. The script launches ``torch.distributed.run`` on
itself (``--worker``, gloo on loopback, a free port), the ranks write their results as JSON
into a temporary folder, and this process prints one table:

  * per world size one torchrun AOT-compiles every format (``fxforge.aot_compile``,
    ``kv_cache=True``, ``tensor_parallel=True`` at world sizes above 1: one artifact per rank);
  * per world size and format a separate torchrun loads it (``fxforge.load``: a rank reads its
    own shard only) and reports, per rank, the resident-set growth across the load and the
    first call (``/proc/self/statm``; also its file-backed part: pages of the mmapped weights
    file) and the artifact's weight bytes (the manifest's
    ``tensor_parallel.weight_bytes``, or the size of ``weights.safetensors`` at world size 1);
  * bytes per decoded token: the weight bytes a rank reads per decode step, estimated as its
    weights file's size (every linear's weights are read once a step; the embedding table is
    counted whole though a step reads one row of it), and the ratio to world size 1's;
  * decode: greedy ``fxforge.generate`` of ``--new-tokens`` tokens after a 16-token prompt (the
    same on every rank), tokens checked equal on every rank and equal to world size 1's (a
    MISMATCH line and exit status 1 otherwise); tok/s is generate's ``tokens_per_second``
    (median of 3 runs, the prompt's prefill included); ms/token is the decode steps' alone
    (median of 3 runs of N tokens minus median of 3 of 1 token, over N - 1);
  * collectives: ``torch.profiler`` (CPU) around ``generate`` of 1 token and of 1 + 8 tokens
    after warm-up; the self CPU time of events named ``*c10d*``, ``*all_reduce*``,
    ``*all_gather*`` or ``*wait_tensor*`` on the thread that runs the model (gloo's worker
    threads, which run while it waits, not counted again), the difference over the 8 decode
    steps; and the collectives (all_reduce / all_gather_into_tensor calls) per step. The time
    includes waiting in ``wait_tensor`` for the other ranks to reach the collective.

With ``int8`` each rank quantizes its own shard (the pass runs before quantization), with a
row-parallel linear's (``o_proj``, ``down_proj``) per-output-channel scales taken from the whole
rows, so every world size holds the same int8 codes and greedy tokens must agree too.
The KV caches hold 256 positions (``max_seq_len=256``, the dynamic length's bound).

On one host the ranks share its cores and memory bandwidth (this bench's record: two cores, two
ranks): what it shows is exactness and per-rank memory, not speed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 16
PROFILE_STEPS = 8
RUNS = 3
MAX_SEQ = 256
COLLECTIVE_MARKS = ("c10d", "all_reduce", "all_gather", "wait_tensor")
# the ops that issue a collective (one each); their c10d/gloo children are not counted again
ISSUING = ("_c10d_functional::all_reduce", "_c10d_functional::all_gather_into_tensor")
NOTE = ("note: all ranks run on this one host and compete for its cores and memory bandwidth "
        "(2 cores here: 2 ranks of 1 thread each): the point is exactness and per-rank memory, "
        "not speed; bytes/token is the rank's weights file size (an estimate: the embedding "
        "table is counted whole, a step reads one row of it)")


# ---------------------------------------------------------------------------------------------
# the ranks (torchrun runs this file with --worker)

def _rss_bytes() -> tuple[int, int]:
    """(resident, of which file-backed or shared: e.g. mmapped weights files) in bytes."""
    with open("/proc/self/statm") as statm:
        fields = statm.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, int(fields[2]) * page


def _trim() -> None:
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _model(args):
    from fxforge.examples import hf_models
    return hf_models.LogitsOnly(hf_models.build(
        "llama", hidden_size=args.hidden, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        vocab_size=args.vocab, max_position_embeddings=MAX_SEQ))


def _prompt(args):
    import torch
    return torch.randint(3, args.vocab, (1, PROMPT_TOKENS),
                         generator=torch.Generator().manual_seed(1))


def _options(fmt: str, world: int) -> dict:
    options = {"kv_cache": True, "max_seq_len": MAX_SEQ}
    if world > 1:
        options["tensor_parallel"] = True
    if fmt != "fp32":
        options["quantize"] = fmt
    return options


def worker_compile(args, rank: int, world: int) -> dict:
    import torch
    import fxforge
    model = _model(args)
    ids = _prompt(args)
    params = sum(p.numel() for p in model.parameters())
    out = {"params": params, "compile_s": {}}
    for fmt in args.formats.split(","):
        start = time.perf_counter()
        fxforge.aot_compile(model, (ids,), Path(args.dir) / fmt,
                            dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=MAX_SEQ)},),
                            **_options(fmt, world))
        out["compile_s"][fmt] = time.perf_counter() - start
        gc.collect()
    return out


def _collective_profile(artifact, ids, new_tokens: int) -> tuple[float, int, dict]:
    """(self CPU seconds of collective events, collectives issued, {name: count}) of one
    ``generate``."""
    from torch.profiler import ProfilerActivity, profile
    import fxforge
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fxforge.generate(artifact, ids, new_tokens)
    events = [e for e in prof.events() if any(mark in e.name for mark in COLLECTIVE_MARKS)]
    # the thread that called generate (it issues the collectives); gloo's own threads' events
    # run while that thread waits in wait_tensor: not counted twice
    callers = {e.thread for e in events if e.name in ISSUING}
    seconds, issued, names = 0.0, 0, {}
    for event in events:
        if event.thread not in callers:
            continue
        seconds += event.self_cpu_time_total / 1e6
        names[event.name] = names.get(event.name, 0) + 1
        issued += event.name in ISSUING
    return seconds, issued, names


def worker_run(args, rank: int, world: int) -> dict:
    import torch
    import fxforge
    torch.set_num_threads(1)
    ids = _prompt(args)
    path = Path(args.dir) / args.format
    _trim()
    before = _rss_bytes()
    start = time.perf_counter()
    artifact = fxforge.load(path)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        artifact(ids)
    _trim()
    after = _rss_bytes()
    folder = path / f"rank{rank}" if (path / "tensor_parallel.json").is_file() else path
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest.get("tensor_parallel")
    file_bytes = (folder / "weights.safetensors").stat().st_size
    weight_bytes = entry["weight_bytes"] if entry else file_bytes

    tokens = fxforge.generate(artifact, ids, args.new_tokens)   # warm-up, and the tokens
    rates, long_s, short_s, repeatable = [], [], [], True
    for _ in range(RUNS):
        again, stats = fxforge.generate(artifact, ids, args.new_tokens, return_stats=True)
        repeatable = repeatable and torch.equal(again, tokens)
        rates.append(stats["tokens_per_second"])
        long_s.append(stats["seconds"])
        short_s.append(fxforge.generate(artifact, ids, 1, return_stats=True)[1]["seconds"])
    one = _collective_profile(artifact, ids, 1)
    more = _collective_profile(artifact, ids, 1 + PROFILE_STEPS)
    return {
        "rank": rank, "world": world, "format": args.format,
        "rss_growth": after[0] - before[0], "rss_file_growth": after[1] - before[1],
        "rss_before": before[0], "load_s": load_s,
        "weight_bytes": weight_bytes, "weights_file_bytes": file_bytes,
        "tokens": tokens[0].tolist() if repeatable else None,   # None: a mismatch
        "tok_s": statistics.median(rates), "tok_s_runs": rates,
        "decode_ms": (statistics.median(long_s) - statistics.median(short_s))
        / max(1, args.new_tokens - 1) * 1e3,
        "collective_ms_per_step": (more[0] - one[0]) / PROFILE_STEPS * 1e3,
        "collectives_per_step": (more[1] - one[1]) / PROFILE_STEPS,
        "collective_events": more[2],
    }


def worker(args) -> int:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = worker_compile(args, rank, world) if args.worker == "compile" \
            else worker_run(args, rank, world)
        name = f"{args.worker}_{args.format or 'all'}_w{world}_r{rank}.json"
        (Path(args.results) / name).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# the launcher

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args, world: int, mode: str, folder: Path, results: Path, fmt: str = "") -> float:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
               os.path.abspath(__file__), "--worker", mode, "--dir", str(folder),
               "--results", str(results), "--formats", args.formats,
               "--new-tokens", str(args.new_tokens), "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--vocab", str(args.vocab),
               "--intermediate", str(args.intermediate)]
    if fmt:
        command += ["--format", fmt]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stdout.write(done.stdout[-4000:])
        sys.stderr.write(done.stderr[-8000:])
        raise SystemExit(f"torchrun {mode} (world size {world}{', ' + fmt if fmt else ''}) "
                         f"failed with exit status {done.returncode}")
    return time.perf_counter() - start


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--formats", default="fp32,int8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--worker", choices=("compile", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--format", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    began = time.perf_counter()
    worlds = [int(w) for w in args.world_sizes.split(",")]
    formats = args.formats.split(",")
    rows, compiles = [], {}
    with tempfile.TemporaryDirectory(prefix="fxf_tp_bench_") as tmp:
        results = Path(tmp) / "results"
        results.mkdir()
        for world in worlds:
            folder = Path(tmp) / f"w{world}"
            wall = _torchrun(args, world, "compile", folder, results)
            per_rank = [json.loads((results / f"compile_all_w{world}_r{r}.json").read_text())
                        for r in range(world)]
            compiles[world] = {"wall_s": wall, "params": per_rank[0]["params"],
                               "per_rank_s": [p["compile_s"] for p in per_rank]}
            print(f"world size {world}: compiled {', '.join(formats)} in {wall:.0f} s "
                  f"(torchrun wall time)", flush=True)
            for fmt in formats:
                wall = _torchrun(args, world, "run", folder, results, fmt)
                for r in range(world):
                    row = json.loads((results / f"run_{fmt}_w{world}_r{r}.json").read_text())
                    row["run_wall_s"] = wall
                    rows.append(row)
                print(f"world size {world}, {fmt}: loaded and ran in {wall:.0f} s", flush=True)

    params = next(iter(compiles.values()))["params"]
    print(f"\nLlama-like, hidden {args.hidden}, 8 heads / 4 KV heads, MLP {args.intermediate}, "
          f"{args.layers} layers, vocabulary {args.vocab}: {params / 1e6:.1f}M parameters; "
          f"prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new (greedy); gloo, "
          f"1 thread per rank")
    header = ("| format | world | rank | weights MB | RSS growth MB (load + 1st call) | "
              "of which file-backed MB | RSS vs world 1 | bytes/token MB | vs world 1 | tok/s | "
              "decode ms/token | collective ms/step | collectives/step | tokens |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    failed = []
    for fmt in formats:
        base = [r for r in rows if r["format"] == fmt and r["world"] == 1]
        base_bytes = base[0]["weights_file_bytes"] if base else None
        base_tokens = base[0]["tokens"] if base else None
        group = [r for r in rows if r["format"] == fmt]
        for row in group:
            same_world = [r for r in group if r["world"] == row["world"]]
            agree = row["tokens"] is not None and all(r["tokens"] == row["tokens"]
                                                      for r in same_world)
            like_one = base_tokens is None or row["tokens"] == base_tokens
            ok = row["tokens_match"] = agree and like_one
            verdict = "identical"
            if not agree:
                verdict = "MISMATCH (ranks differ, or runs not repeatable)"
            elif not like_one:
                at = next(i for i, (a, b) in enumerate(zip(row["tokens"], base_tokens))
                          if a != b) - PROMPT_TOKENS
                verdict = f"MISMATCH vs world 1 from new token {at} (ranks agree)"
            row["tokens_verdict"] = verdict
            if not ok:
                mine = row["tokens"] and row["tokens"][PROMPT_TOKENS:]
                theirs = base_tokens and base_tokens[PROMPT_TOKENS:]
                failed.append(f"MISMATCH: {fmt}, world size {row['world']}, rank {row['rank']}: "
                              f"{verdict}: new tokens {mine} vs world size 1's {theirs}")
            ratio = row["weights_file_bytes"] / base_bytes if base_bytes else float("nan")
            rss = row["rss_growth"] / base[0]["rss_growth"] if base else float("nan")
            row["rss_growth_vs_world1"] = rss
            row["bytes_per_token"] = row["weights_file_bytes"]
            row["bytes_per_token_vs_world1"] = ratio
            print(f"| {fmt} | {row['world']} | {row['rank']} | {_mb(row['weight_bytes'])} | "
                  f"{_mb(row['rss_growth'])} | {_mb(row['rss_file_growth'])} | {rss:.2f} | "
                  f"{_mb(row['weights_file_bytes'])} | "
                  f"{ratio:.2f} | "
                  f"{row['tok_s']:.1f} | {row['decode_ms']:.1f} | "
                  f"{row['collective_ms_per_step']:.2f} | {row['collectives_per_step']:.1f} | "
                  f"{verdict} |")
    print(NOTE)
    for line in failed:
        print(line)
    total = time.perf_counter() - began
    print(f"total wall time {total:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"model": {"hidden": args.hidden, "intermediate": args.intermediate,
                       "layers": args.layers, "vocab": args.vocab, "params": params},
             "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens,
             "compile": compiles, "rows": rows, "ok": not failed, "wall_s": total,
             "note": NOTE}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
