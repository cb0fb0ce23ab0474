"""Integration tier: a local Ray with 2 CPUs, a tokenizer trained here and a tiny random Llama."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (dashboard off, bound to this machine)."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A folder with a tokenizer (with chat template) and a tiny random Llama, as a user would have."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ropo_ray.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    corpus = ["What is 12 + 7? The answer is 19.", "Hello there, how are you today?", "Tell me a joke please."] * 20
    tokenizer = train_tokenizer(corpus, 320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
