"""Tiny random models (hidden 16-64) of the four architecture families graft must handle."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 96


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread: with two, a busy machine makes OpenMP's
    spinning threads wait on each other (measured: 10 tiny steps took 9 s instead of 0.04 s). A test file
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pad_collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad token rows ({"input_ids", "labels"}) into a batch with pad id 0, labels -100 and a mask."""
    width = max(len(b["input_ids"]) for b in batch)
    pad = [width - len(b["input_ids"]) for b in batch]
    return {
        "input_ids": torch.tensor([b["input_ids"] + [0] * p for b, p in zip(batch, pad)]),
        "labels": torch.tensor([b["labels"] + [-100] * p for b, p in zip(batch, pad)]),
        "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * p for b, p in zip(batch, pad)]),
    }


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}


def batch_for(arch: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def perturb_adapters(model: torch.nn.Module, std: float = 0.1, seed: int = 123) -> None:
    """Give every trainable tensor a random, non-trivial value (B = 0 would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


@pytest.fixture(params=list(FACTORIES))
def arch(request):
    return request.param
