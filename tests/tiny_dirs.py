"""Tiny random models saved as transformers directories with a real tokenizer, for CLI runs of a second.

A decoder (Llama, hidden 32, SmolLM2's tokenizer) and an encoder without a language-model head (BERT,
hidden 32, all-MiniLM-L6-v2's tokenizer, saved as a plain ``BertModel`` as MiniLM is).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import graft.models

ALPACA = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(6)]
LABELLED = [{"text": f"item {i} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i in range(8)]


def decoder_dir(path: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def encoder_dir(path: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(graft.models.resolve("minilm"), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tok), max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
