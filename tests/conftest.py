"""Shared fixtures: a tiny random Llama (head_dim 32) built in memory, no download."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
