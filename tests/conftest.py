"""Shared fixtures: tiny LLaMA models built from configs (nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(tied: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied, use_cache=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def lm_batch(seed: int, batch: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def model():
    return tiny_llama()
