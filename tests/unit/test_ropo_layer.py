"""The RoPO layer inside a Llama model: identity at init, merge, gradients, energy, parameter count."""

from __future__ import annotations

import math

import torch
from torch import nn

from ropo_ray.adapters.inject import inject_ropo, merge_ropo, ropo_layers, trainable_report
from ropo_ray.adapters.ropo_linear import RoPOLinear
from ropo_ray.config.schema import AdapterConfig
from ropo_ray.eval.energy import hyperspherical_energy, layer_energies

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [3, 3, 8, 1, 0, 6, 12, 9]])


def randomise_adapters(model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ropo_layers(model).values():
            for p in layer.rotation:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen))


def test_identity_init_reproduces_base_logits(tiny_llama):
    base_logits = tiny_llama(IDS).logits
    names = inject_ropo(tiny_llama, AdapterConfig())
    assert len(names) == 2 * 4  # q, k, v, o in 2 layers
    assert (tiny_llama(IDS).logits - base_logits).abs().max() <= 1e-6


def test_merged_model_equals_adapted_model(tiny_llama):
    inject_ropo(tiny_llama, AdapterConfig(block_sizes=(2, 4, 8), target_modules=("q_proj", "v_proj", "down_proj")))
    randomise_adapters(tiny_llama)
    adapted = tiny_llama(IDS).logits
    merge_ropo(tiny_llama)
    assert not ropo_layers(tiny_llama)
    assert all(type(m) is nn.Linear for n, m in tiny_llama.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert (tiny_llama(IDS).logits - adapted).abs().max() <= 1e-5


def test_layer_with_bias_matches_formula():
    """y = (m/c) * (W (R^T x)) + b, written out with the dense R."""
    torch.manual_seed(0)
    base = nn.Linear(12, 5)
    layer = RoPOLinear(base, (2, 4), "shift")
    with torch.no_grad():
        for p in layer.rotation:
            p.normal_(0, 0.4)
        layer.magnitude.mul_(1.5)
    from ropo_ray.adapters.rotation import rotation_matrix

    r = rotation_matrix(layer.blocks(), layer.layouts(torch.device("cpu")), 12)
    x = torch.randn(3, 12)
    expected = 1.5 * ((x @ r) @ base.weight.T) + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.merged_linear()(x), expected, atol=1e-5)


def test_gradients_reach_only_rotation_and_magnitude(tiny_llama):
    inject_ropo(tiny_llama, AdapterConfig())
    tiny_llama(IDS).logits.logsumexp(-1).sum().backward()
    for name, p in tiny_llama.named_parameters():
        is_adapter = ".rotation." in name or name.endswith(".magnitude")
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_energy_unchanged_by_ropo_changed_by_full_update(tiny_llama):
    names = inject_ropo(tiny_llama, AdapterConfig(target_modules=("q_proj", "o_proj")))
    before = layer_energies(tiny_llama, names)
    randomise_adapters(tiny_llama, scale=0.8)
    after = layer_energies(tiny_llama, names)
    for n in names:
        assert math.isclose(after[n], before[n], rel_tol=1e-5), n
    w = tiny_llama.get_submodule(names[0]).base.weight.detach()
    assert abs(hyperspherical_energy(w + 0.05 * torch.randn_like(w)) - before[names[0]]) > 1e-3 * before[names[0]]


def test_energy_of_known_configuration():
    """Rows e1, e2, -e1 in R^2: distances |e1-e2| = sqrt 2 (twice: e1-e2, e2-(-e1)), |e1+e1| = 2.
    HE = 2 * (1/sqrt2 + 1/sqrt2 + 1/2) = 2 * sqrt2 + 1 = 3.828427..."""
    w = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])  # norms do not matter
    assert math.isclose(hyperspherical_energy(w, chunk=2), 2 * math.sqrt(2) + 1, rel_tol=1e-6)


def test_trainable_count_llama7b_closed_formula():
    """Llama-7B shape (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), q/k/v/o adapted,
    block sizes (2, 4, 8). Per module: magnitudes 4096 + rotation 4096/2*1 + 4096/4*6 + 4096/8*28
    = 4096 + 2048 + 6144 + 14336 = 26624; times 4 modules times 32 layers = 3,407,872.
    Base: 32 * (4 * 4096^2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096 = 6,738,415,616."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inject_ropo(model, AdapterConfig(block_sizes=(2, 4, 8)))
    report = trainable_report(model)
    assert report["trainable"] == 3_407_872
    assert report["base"] == 6_738_415_616
    assert math.isclose(report["percent"], 100 * 3_407_872 / 6_738_415_616)


def test_magnitude_only_fraction_matches_spec_for_mistral7b_shape():
    """ROPO_SPEC: magnitudes alone on Mistral-7B (q, o out 4096; k, v out 1024 with GQA; 32 layers):
    32 * (4096 + 1024 + 1024 + 4096) = 327,680 trainable, 0.0045% of 7.24B."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    inject_ropo(model, AdapterConfig(block_sizes=(2,)))
    for layer in ropo_layers(model).values():
        for p in layer.rotation:
            p.requires_grad_(False)
    layers = ropo_layers(model).values()
    magnitudes = sum(layer.out_features for layer in layers)
    assert magnitudes == 327_680
    assert round(100 * magnitudes / trainable_report(model)["base"], 4) == 0.0045


def test_injection_without_match_names_the_available_layers(tiny_llama):
    import pytest

    with pytest.raises(ValueError, match="q_proj"):
        inject_ropo(tiny_llama, AdapterConfig(target_modules=("qproj",)))
