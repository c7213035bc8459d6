"""``fxforge.generate``: autoregressive decoding with any callable that returns logits.

The model is driven by the classic loop, always in this exact form::

    logits = model(ids)             # the whole sequence so far, [B, T] -> [B, T, V]
    next = pick(logits[:, -1])      # greedy or sampled
    ids = cat([ids, next[:, None]], dim=1)

Every call passes the full sequence so far, with the same batch, grown by the new
tokens. That is what the fxforge backend's transparent KV-cache mode recognises
(the new input extends the previous one) and turns into one incremental decode
step, so the same loop runs an eager module at quadratic cost and a compiled
one at the cost of one token. (With a speculative ``draft``, ``fxforge/speculative.py``, a
call may add several tokens, and the next one keep only a prefix of them: the KV cache rolls
back.) ``model`` may be an ``nn.Module``, a
``torch.compile``'d module, an AOT artifact from ``fxforge.load`` (called
positionally), or any function; it may return the logits tensor ``[B, T, V]``
(``[B, V]`` is read as last-position logits), a tuple/list whose first element
is that tensor, or an object/dict with ``logits`` (a Hugging Face ``ModelOutput``).

Prompts of different lengths: a model without an attention-mask input, called on
a right- or left-padded batch, would attend to padding it was never trained
with, and left padding also shifts its position ids. The only correct general
approach for such a black box is to not pad: rows are grouped by prompt length,
each group of equal-length rows is generated as its own batch, and the groups
run one after the other (not interleaved, so each group's calls form one
growing sequence for the KV cache).

Each call runs in a ``fxforge.Session`` (``fxforge/sessions.py``): the one passed as
``session=``, else one active in the caller's context, else a session of its own, closed at
the end. So calls from several threads through one compiled module or artifact each decode
on their own KV caches.
"""
from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from fxforge.direct_steps import DirectSteps
from fxforge.distributed import is_tensor_parallel, shared_seed
from fxforge.sessions import Session, active_session

StreamCallback = Callable[[int, torch.Tensor, Sequence[int]], None]
Prompts = Union[torch.Tensor, Sequence[Union[torch.Tensor, Sequence[int]]]]


@dataclass(frozen=True)
class _Sampling:
    """How the next token is picked from last-position logits."""

    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]


@dataclass
class _GroupResult:
    """One group of equal-length prompts after generation."""

    rows: list[int]  # input indices of the group's rows
    ids: torch.Tensor  # [G, T + steps]
    generated: list[int]  # per row: new tokens up to and including its stop token
    steps: int  # tokens appended to each row
    direct_steps: int  # model calls straight to the fxforge graph (fxforge/direct_steps.py)
    calls: int  # model calls made (as many as steps, but for speculative rounds)


def generate(model: Callable[..., Any], input_ids: Prompts, max_new_tokens: int, *,
             do_sample: Optional[bool] = None, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_tokens: Union[int, Iterable[int], None] = None, pad_token_id: Optional[int] = None,
             stream: Optional[StreamCallback] = None, max_seq_len: Optional[int] = None,
             return_stats: bool = False, session: Optional[Session] = None,
             direct_steps: Optional[bool] = None, draft: Any = None, draft_k: Any = "auto",
             draft_options: Optional[dict] = None) -> Any:
    """Generate up to ``max_new_tokens`` tokens after each prompt, under ``torch.no_grad()``.

    ``input_ids``: a ``[B, T]`` integer tensor (all prompts the same length), a 1-D
    tensor (one prompt), or a list of prompts (1-D tensors or lists of ints) that
    may differ in length; list prompts are placed on the device of the first
    tensor among them, else of the model's first parameter/buffer, else the CPU.

    Picking: greedy (argmax) unless sampling. ``do_sample=None`` (default) samples
    iff ``temperature``, ``top_k`` or ``top_p`` is given; ``do_sample=False`` is
    greedy whatever else is given (as in Hugging Face). Sampling applies
    ``temperature`` (default 1.0), then keeps the ``top_k`` largest logits, then
    the smallest set of tokens whose probability reaches ``top_p``, and draws from
    a ``torch.Generator`` seeded once with ``seed`` (a random seed when ``None``);
    the global RNG is never used, so the same seed gives the same tokens.

    ``stop_tokens`` (an int or ints): a row stops after emitting one; the loop ends
    when every row of its group stopped or after ``max_new_tokens`` steps. After
    its stop, a row's tokens are ``pad_token_id`` (default: the first stop token,
    the smallest for a set, or 0 without stop tokens).

    ``stream(step, tokens, rows)`` is called after each step: ``step`` is the
    0-based index of the new token, ``tokens`` the ``[G]`` tensor of new tokens
    (``pad_token_id`` for rows already stopped) and ``rows`` the input indices
    of those tokens. A tensor input is one group (``rows = [0, ..., B-1]``); list
    prompts call it per group of equal-length rows, one group after the other.

    ``max_seq_len``: a ``ValueError`` if the longest prompt plus ``max_new_tokens``
    exceeds it.

    ``session``: the ``fxforge.Session`` whose KV caches the calls use (kept after the call:
    a next turn that extends these sequences continues from the cache); by default the one
    active in the caller's context, else a new one closed when the call returns.

    ``direct_steps``: decode steps of a ``torch.compile``'d model may go straight to its fxforge
    KV-cache graph, past dynamo's guards and wrappers (``fxforge/direct_steps.py`` says when):
    ``None`` (default) where its compiled forward is proven free of Python side effects,
    ``True`` where the caller vouches for that (e.g. Hugging Face models, whose wrappers set
    and reset context state at every call), ``False`` never.

    ``draft``: speculative decoding (``fxforge/speculative.py``): a logits callable sharing
    the model's vocabulary, or ``"self"`` for one fxforge derives from the model's own
    ``nn.Module`` (compiled with ``draft_options``, default ``speculative.SELF_DRAFT``).
    Each round it proposes ``draft_k`` tokens (``"auto"``: chosen each round from measured
    acceptance and costs, ``fxforge/draft_length.py``; or an int in 1..16) and the model checks
    them in one call. Greedy tokens equal those without a draft; sampled ones follow the
    model's distribution (the rejection rule). With a draft, the same seed gives the same
    tokens only at a fixed ``draft_k``: ``"auto"`` picks lengths from measured times, and a
    length changes which draws the tokens come from. Stops, padding and ``stream`` are unchanged.

    Returns the sequences (prompt + generated tokens): for a ``[B, T]`` tensor a
    ``[B, T + n]`` tensor, ``n`` the number of steps run (fewer than
    ``max_new_tokens`` when every row stopped; stopped rows padded with
    ``pad_token_id``); for a 1-D tensor a 1-D tensor; for a list, a list of 1-D
    tensors in input order, each ending at its stop token (no padding). With
    ``return_stats=True``, returns ``(sequences, stats)`` where ``stats`` is a
    dict: ``steps`` (model calls), ``direct_steps`` (of which went straight to a compiled
    model's fxforge graph, past dynamo: ``fxforge/direct_steps.py``), ``new_tokens`` (tokens
    generated, up to and
    including stop tokens, summed over rows), ``seconds`` (wall time of the
    whole call, prompt processing included) and ``tokens_per_second``; with a draft also
    ``speculative``: ``rounds``, ``drafted``, ``accepted``, ``acceptance_rate``, ``k_chosen``
    (rounds per draft length) and ``draft`` (a description).
    """
    sampling = _check_sampling(do_sample, temperature, top_k, top_p)
    _check_count("max_new_tokens", max_new_tokens, minimum=0)
    if direct_steps not in (None, True, False):
        raise TypeError(f"direct_steps must be None, True or False, got {direct_steps!r}")
    stops = _stop_list(stop_tokens)
    pad = _pad_token(pad_token_id, stops)
    prompts, kind = _prompt_rows(input_ids, model)
    longest = max(row.shape[-1] for row in prompts) if kind == "list" else prompts.shape[1]
    if max_seq_len is not None:
        _check_count("max_seq_len", max_seq_len, minimum=1)
        if longest + max_new_tokens > max_seq_len:
            raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens "
                             f"({max_new_tokens}) is {longest + max_new_tokens}, more than "
                             f"max_seq_len={max_seq_len}")
    if is_tensor_parallel(model) and draft is not None and draft_k == "auto":
        raise ValueError("a tensor-parallel model decodes with a draft only at a fixed draft_k: "
                         "draft_k='auto' follows each rank's own wall time, and ranks that "
                         "draft different lengths run different collectives")
    picker = _TokenPicker(sampling, shared_seed(seed, model) if sampling.do_sample else seed)
    start = time.perf_counter()
    with torch.no_grad(), _decoding_session(session):
        grouped = _groups(prompts, kind)
        spec, run = _speculation(model, draft, draft_k, draft_options, grouped[0][1])
        groups = [run(model, *spec, ids, rows, max_new_tokens, picker, stops, pad, stream,
                      direct_steps)
                  for rows, ids in grouped]
    seconds = time.perf_counter() - start
    sequences = _assemble(groups, kind)
    if not return_stats:
        return sequences
    new_tokens = sum(sum(g.generated) for g in groups)
    stats = {"steps": sum(g.calls for g in groups),
             "direct_steps": sum(g.direct_steps for g in groups), "new_tokens": new_tokens,
             "seconds": seconds,
             "tokens_per_second": new_tokens / seconds if seconds > 0 else float("inf")}
    if spec:
        stats["speculative"] = spec[0].stats()
    return sequences, stats


def _speculation(model: Any, draft: Any, draft_k: Any, draft_options: Optional[dict],
                 example_ids: torch.Tensor) -> tuple[tuple, Callable[..., _GroupResult]]:
    """(extra arguments, group runner): the classic loop without a draft, else speculative
    rounds (``fxforge/speculative.py``)."""
    if draft is None:
        if draft_k != "auto" or draft_options is not None:
            raise ValueError("draft_k and draft_options apply with a draft (draft=...) only")
        return (), _run_group
    from fxforge import speculative
    return (speculative.prepare(model, draft, draft_k, draft_options, example_ids),), \
        speculative.run_group


@contextlib.contextmanager
def _decoding_session(session: Optional[Session]) -> Iterator[None]:
    """``session`` activated; else the active one; else a new one, closed at the end."""
    if session is not None and not isinstance(session, Session):
        raise TypeError(f"session must be a fxforge.Session, got {type(session).__name__}")
    if session is None and active_session() is not None:
        yield
        return
    own = session is None
    with (session or Session()) as active:
        try:
            yield
        finally:
            if own:
                active.close()


# ---------------------------------------------------------------- argument checks

def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_sampling(do_sample: Optional[bool], temperature: Optional[float], top_k: Optional[int],
                    top_p: Optional[float]) -> _Sampling:
    if top_k is not None:
        _check_count("top_k", top_k, minimum=1)
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature is not None and not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if do_sample is None:
        do_sample = temperature is not None or top_k is not None or top_p is not None
    if do_sample and temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} "
                         "(use do_sample=False for greedy decoding)")
    return _Sampling(bool(do_sample), float(1.0 if temperature is None else temperature), top_k, top_p)


def _stop_list(stop_tokens: Union[int, Iterable[int], None]) -> list[int]:
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, torch.Tensor):
        stop_tokens = stop_tokens.reshape(-1).tolist()
    items = [stop_tokens] if isinstance(stop_tokens, numbers.Integral) else list(stop_tokens)
    if isinstance(stop_tokens, (set, frozenset)):
        items.sort()
    for t in items:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"stop_tokens must be non-negative ints, got {t!r}")
    return [int(t) for t in items]


def _pad_token(pad_token_id: Optional[int], stops: list[int]) -> int:
    if pad_token_id is None:
        return stops[0] if stops else 0
    _check_count("pad_token_id", pad_token_id, minimum=0)
    return int(pad_token_id)


# ---------------------------------------------------------------- prompts

def _prompt_rows(input_ids: Prompts, model: Any) -> tuple[Any, str]:
    """The prompts, validated, and their kind: "tensor" ([B, T]), "vector" (1-D) or "list"."""
    if isinstance(input_ids, torch.Tensor):
        _check_ids_tensor(input_ids, "input_ids")
        if input_ids.dim() == 1:
            return input_ids.unsqueeze(0), "vector"
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 1-D [T] or 2-D [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has no rows (batch size 0)")
        return input_ids, "tensor"
    if not isinstance(input_ids, Sequence) or isinstance(input_ids, (str, bytes)):
        raise TypeError("input_ids must be a tensor or a list of prompts (1-D tensors or lists "
                        f"of ints), got {type(input_ids).__name__}")
    if len(input_ids) == 0:
        raise ValueError("input_ids is an empty list: no prompts to generate from")
    if all(isinstance(x, numbers.Integral) for x in input_ids):
        raise TypeError("input_ids is a flat list of ints; pass a list of prompts "
                        "([ids] for a single prompt) or a tensor")
    device = _prompt_device(input_ids, model)
    return [_row_tensor(row, i, device) for i, row in enumerate(input_ids)], "list"


def _check_ids_tensor(ids: torch.Tensor, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(ids.shape)}): a prompt needs at least one token")
    if bool((ids < 0).any()):
        raise ValueError(f"{what} holds negative token ids")


def _row_tensor(row: Any, index: int, device: torch.device) -> torch.Tensor:
    what = f"input_ids[{index}]"
    if isinstance(row, torch.Tensor):
        if row.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(row.shape)}")
        _check_ids_tensor(row, what)
        return row.to(device)
    if not isinstance(row, Sequence) or isinstance(row, (str, bytes)):
        raise TypeError(f"{what} must be a 1-D tensor or a list of ints, got {type(row).__name__}")
    bad = next((t for t in row if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
    if bad is not None:
        raise TypeError(f"{what} holds a non-integer token id: {bad!r}")
    tensor = torch.tensor([int(t) for t in row], dtype=torch.long, device=device)
    _check_ids_tensor(tensor, what)
    return tensor


def _prompt_device(rows: Sequence[Any], model: Any) -> torch.device:
    for row in rows:
        if isinstance(row, torch.Tensor):
            return row.device
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _groups(prompts: Any, kind: str) -> list[tuple[list[int], torch.Tensor]]:
    """(input row indices, [G, T] ids) per group of equal-length prompts, by first appearance."""
    if kind != "list":
        return [(list(range(prompts.shape[0])), prompts)]
    by_length: dict[tuple, list[int]] = {}
    for i, row in enumerate(prompts):
        by_length.setdefault((row.shape[0], row.dtype), []).append(i)
    return [(rows, torch.stack([prompts[i] for i in rows])) for rows in by_length.values()]


def _assemble(groups: list[_GroupResult], kind: str) -> Any:
    if kind == "tensor":
        return groups[0].ids
    if kind == "vector":
        return groups[0].ids[0]
    out: dict[int, torch.Tensor] = {}
    for g in groups:
        prompt_len = g.ids.shape[1] - g.steps
        for j, row in enumerate(g.rows):
            out[row] = g.ids[j, :prompt_len + g.generated[j]]
    return [out[i] for i in range(len(out))]


# ---------------------------------------------------------------- the loop

def _run_group(model: Callable[..., Any], ids: torch.Tensor, rows: list[int], max_new_tokens: int,
               picker: "_TokenPicker", stops: list[int], pad: int,
               stream: Optional[StreamCallback], direct_steps: Optional[bool]) -> _GroupResult:
    """The classic loop on one batch: full sequence in, last logits -> next token, append."""
    batch = ids.shape[0]
    stop_ids = torch.tensor(stops, dtype=ids.dtype, device=ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    generated = torch.zeros(batch, dtype=torch.long, device=ids.device)
    steps = 0
    call = DirectSteps(model, _found_logits, direct_steps)   # past dynamo where that is sound
    if torch.is_inference_mode_enabled() and not ids.is_inference():
        # under inference_mode the loop's later ids are inference tensors: the first one too, or
        # dynamo's guard on the input's dispatch keys fails at the second call and it compiles again
        ids = ids.clone()
    for step in range(max_new_tokens):
        logits = _last_logits(call(ids), batch)
        steps += 1
        tokens = picker(logits).to(ids.dtype)
        if stops:   # without stop tokens no row ever finishes: no masking, no per-row count
            tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
            generated += (~finished).long()
            finished |= torch.isin(tokens, stop_ids)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        if stream is not None:
            stream(step, tokens, list(rows))
        if stops and bool(finished.all()):
            break
    counts = generated.tolist() if stops else [steps] * batch
    return _GroupResult(rows, ids, counts, steps, call.direct_calls, steps)


def _found_logits(out: Any) -> Optional[torch.Tensor]:
    """The logits tensor in whatever the model returned, or None."""
    logits = out
    if not isinstance(logits, torch.Tensor):
        found = getattr(logits, "logits", None)
        if found is None and isinstance(logits, dict):
            found = logits.get("logits")
        if found is None and isinstance(logits, (tuple, list)) and logits:
            found = logits[0]
        logits = found
    return logits if isinstance(logits, torch.Tensor) else None


def _last_logits(out: Any, batch: int) -> torch.Tensor:
    """The last position's logits [B, V] from whatever the model returned."""
    logits = _found_logits(out)
    if logits is None:
        raise TypeError("the model must return logits: a tensor [B, T, V], a tuple/list whose "
                        "first element is one, or an object with .logits; got "
                        f"{type(out).__name__}")
    if logits.dim() not in (2, 3) or logits.shape[0] != batch:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected "
                         f"[B, T, V] (or [B, V]) with B={batch}")
    return logits[:, -1] if logits.dim() == 3 else logits


class _TokenPicker:
    """Greedy argmax, or sampling from a generator seeded once (never the global RNG)."""

    def __init__(self, sampling: _Sampling, seed: Optional[int]):
        self.sampling, self.seed = sampling, seed
        self.generator: Optional[torch.Generator] = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.sampling.do_sample:
            return greedy(logits)
        probs = _filtered(logits.float(), self.sampling).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator_for(logits.device))[:, 0]

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The one generator of this call (seeded at first use): every draw comes from it."""
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)
        return self.generator


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[B, V]`` logits, the same indices (the first maximum; the
    first NaN where a row has one). For fp32/fp64 CPU logits numpy's argmax gives them, much
    faster: over SmolLM2's 49,152 logits, on one thread of an AVX-512 Zen 4 EPYC (a shared host),
    torch 2.13's argmax took ~70 us (~55 us on 2 threads) and numpy 2.4's ~6 us."""
    if type(logits) is not torch.Tensor or logits.device.type != "cpu" or logits.is_neg() \
            or logits.dtype not in (torch.float32, torch.float64) or logits.requires_grad \
            or logits.dim() != 2 or logits.shape[-1] == 0:
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.numpy().argmax(axis=-1).astype(np.int64, copy=False))


def _filtered(logits: torch.Tensor, sampling: _Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus): dropped tokens get -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the first token always stays
        ordered = ordered.masked_fill(mass_before >= sampling.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    return logits
