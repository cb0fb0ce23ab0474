"""Model FLOPs of a training step, counting only the work the step must do, and the machine's ceiling.

Model-FLOPs utilisation (MFU, arXiv 2204.02311 appendix B) divides the FLOPs a step needs by the
time it took and the hardware's peak. "Needs" here follows from which weights train:

- every linear layer (frozen or not) costs 2*in*out FLOPs per token forward, and 2*in*out backward for
  the gradient of its input (the layers below it need it);
- only a trainable weight costs another 2*in*out per token for its own gradient. With frozen base
  weights (RoPO, LoRA) that third term is absent, so such a step needs about 4N, not 6N, per token;
- attention scores and the weighted sum cost 4*T^2*d per layer and sequence forward (T = the
  sequence's real length, d = heads * head_dim; counted in full, no causal halving), twice that backward;
- a RoPO factor of block size b turns each token's d_in-vector with 2*d_in*b FLOPs forward, and costs
  4*d_in*b backward (input gradient and block gradient). Building the blocks (Cayley) is per step,
  not per token, and is left out;
- recomputation under activation checkpointing and padding tokens are hardware work, not model
  work: they lower MFU instead of being counted.
- with the shared-prompt layout (train.shared_prompt) a pair is one sequence of prompt + chosen + rejected
  tokens, the prompt counted once, and its attention T^2 is that sequence's: the model work of that layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepFlopModel:
    """Per-token and per-squared-length FLOPs of one forward+backward of a model."""

    per_token: float  # linear layers and rotations, forward + backward
    per_length_sq: float  # attention, forward + backward, per (sequence length)^2

    def flops(self, tokens: int, sum_length_sq: int) -> float:
        """FLOPs of a step over `tokens` real tokens in sequences whose squared lengths sum to `sum_length_sq`."""
        return self.per_token * tokens + self.per_length_sq * sum_length_sq


def _unwrap_config(model: nn.Module):
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            return config
    raise ValueError(f"{type(model).__name__} has no transformer config (num_hidden_layers) to count attention")


def step_flop_model(model: nn.Module) -> StepFlopModel:
    """Count the linear layers (and RoPO rotations) of `model` as they are at this moment (frozen or not)."""
    from ropo_ray.adapters.ropo_linear import RoPOLinear

    per_token = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            in_f, out_f = module.weight.shape[1], module.weight.shape[0]
            per_token += (6.0 if module.weight.requires_grad else 4.0) * in_f * out_f
        elif isinstance(module, RoPOLinear):
            per_token += 6.0 * module.in_features * sum(module.block_sizes)
    config = _unwrap_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    per_length_sq = 3 * 4.0 * width * config.num_hidden_layers
    return StepFlopModel(per_token=per_token, per_length_sq=per_length_sq)


def batch_sizes(attention_mask: torch.Tensor) -> tuple[int, int]:
    """(real tokens, sum of squared real sequence lengths) of a [B, T] attention mask."""
    lengths = attention_mask.sum(dim=1).to(torch.int64)
    return int(lengths.sum()), int((lengths * lengths).sum())


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Measured matmul FLOP/s of this process with its current torch thread count (the 'ceiling').

    Square `size` matmuls for about `seconds` after one warm-up; best of the timed runs.
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - t0))
    return best
