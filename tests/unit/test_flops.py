"""Step FLOPs: hand-counted for a tiny Llama, and checked against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from ropo_ray.adapters.inject import inject_ropo
from ropo_ray.config.schema import AdapterConfig
from ropo_ray.train.flops import batch_sizes, measure_peak_flops, step_flop_model

# per layer, in*out of q (64x64), k and v (64x32 each: one kv head of 32), o (64x64),
# gate and up (64x128 each), down (128x64); two layers; lm_head 64x320
LINEAR_PRODUCTS = 2 * (4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192) + 64 * 320  # = 94,208


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         attn_implementation="eager")
    return LlamaForCausalLM(config)


def test_hand_count_frozen_and_trainable():
    model = tiny_llama()
    assert LINEAR_PRODUCTS == 94_208
    full = step_flop_model(model)
    assert full.per_token == 6 * LINEAR_PRODUCTS  # every weight trains: forward, input grad, weight grad
    assert full.per_length_sq == 3 * 4 * 64 * 2  # 2 heads x 32, two layers, forward + 2x backward
    model.requires_grad_(False)
    assert step_flop_model(model).per_token == 4 * LINEAR_PRODUCTS  # no weight gradients
    assert step_flop_model(model).flops(10, 100) == 4 * LINEAR_PRODUCTS * 10 + 1536 * 100


def counted_flops(model: torch.nn.Module, length: int) -> int:
    """What torch's dispatcher-level counter sees for one forward + backward of a [1, length] batch whose
    embeddings require grad (so backward reaches every layer, as it must below a trained layer)."""
    ids = torch.randint(0, 320, (1, length))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds).logits.float().logsumexp(-1).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("setup", ["frozen", "full", "ropo"])
def test_matches_torch_flop_counter(setup):
    model = tiny_llama()
    if setup != "full":
        model.requires_grad_(False)
    if setup == "ropo":
        # torch's FlopCounterMode sees aten ops only, not the native band kernel: count the block-matmul form,
        # whose FLOPs (the ones the step must do) the flop model states.
        inject_ropo(model, AdapterConfig(block_sizes=(2, 8), kernel="torch"))
    flop_model = step_flop_model(model)
    short, long = 24, 48
    predicted = {n: flop_model.flops(n, n * n) for n in (short, long)}
    counted = {n: counted_flops(model, n) for n in (short, long)}
    # what grows with the tokens agrees (rotary position embeddings add a few FLOPs left out) ...
    assert counted[long] - counted[short] == pytest.approx(predicted[long] - predicted[short], rel=2e-3)
    # ... and what does not is the rotation blocks' construction, once per step. Of it the counter sees matmuls:
    # per block, the skew matrix from its b(b-1)/2 parameters (a [1, P] x [P, b^2] product forward and one
    # backward: 4 P b^2 FLOPs) and the Cayley backward's two b x b products (dL/dS = -2 M^T G M^T: 4 b^3); the
    # forward's elimination is elementwise. 8 adapted layers of input 64: 32 blocks of 2 and 8 of 8 each.
    per_block = {b: 4 * (b * (b - 1) // 2) * b**2 + 4 * b**3 for b in (2, 8)}  # {2: 48, 8: 9216}
    building = 8 * (32 * per_block[2] + 8 * per_block[8]) if setup == "ropo" else 0  # = 602,112
    assert abs(counted[short] - predicted[short] - building) <= 0.01 * predicted[short]


def test_batch_sizes_counts_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert batch_sizes(mask) == (5, 9 + 4)


def test_peak_flops_is_plausible():
    peak = measure_peak_flops(size=256, seconds=0.1)
    assert 1e8 < peak < 1e13  # between a slow core and far beyond these machines
