"""Baselines behind the same interface as RoPO: attach, train only adapter params, merge to plain weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ropo_ray.adapters.registry import ADAPTERS, attach_adapter, get_adapter, merge_adapter
from ropo_ray.config.schema import AdapterConfig
from tests.conftest import make_tiny_llama

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _perturb_trainable(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["ropo", "lora", "oft", "boft"])
def test_adapter_starts_at_base_trains_few_params_and_merges(kind):
    model = make_tiny_llama()
    base_logits = model(IDS).logits
    cfg = AdapterConfig(type=kind, oft_block_size=8, lora_r=4)
    model = attach_adapter(model, cfg)
    # peft's LoRA starts at B = 0, OFT / BOFT and RoPO at the identity: the step-0 policy is the reference.
    assert (model(IDS).logits - base_logits).abs().max() < 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in trainable)
    _perturb_trainable(model)
    adapted = model(IDS).logits
    assert (adapted - base_logits).abs().max() > 1e-4
    merged = merge_adapter(model, kind)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    assert (merged(IDS).logits - adapted).abs().max() < 1e-4


def test_full_adapter_trains_everything():
    model = attach_adapter(make_tiny_llama(), AdapterConfig(type="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert merge_adapter(model, "full") is model


def test_registry_names_and_error():
    assert set(ADAPTERS) == {"ropo", "lora", "oft", "boft", "full"}
    with pytest.raises(ValueError, match="did you mean 'lora'"):
        get_adapter("lorra")
