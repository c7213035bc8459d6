"""Real text to calibrate on: CPython's own ``pydoc_data.topics`` (it ships with every Python),
tokenized into windows, for passes that measure on the compile's example inputs (``quantize``
with ``gptq`` rounding, ``quantize="auto"``)."""
from __future__ import annotations

from typing import Any

import torch

from fxforge.examples.smollm2 import reference_text

TEXT_TOKENS = 2048


def calibration_text(tokenizer: Any, tokens: int = TEXT_TOKENS, windows: int = 1) -> torch.Tensor:
    """``[windows, tokens // windows]`` token ids of ``pydoc_data.topics`` (ships with Python):
    real text to compile on, for a tokenizer called as Hugging Face's are."""
    ids = torch.as_tensor(tokenizer(reference_text())["input_ids"][:tokens])
    return ids[: (ids.numel() // windows) * windows].view(windows, -1)
