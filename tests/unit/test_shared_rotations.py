"""One batched rotation computation per model forward (ropo_linear.share_rotations) against each layer's own.

The reference is the same adapted model with sharing switched off layer by layer (every layer computes its own
coefficients, the path a single layer called on its own takes): logits and every gradient must agree, also with
gradient checkpointing and with gradients accumulated over two forwards.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ropo_ray.adapters import ropo_linear
from ropo_ray.adapters import rotation as rot
from ropo_ray.adapters.inject import inject_ropo, ropo_layers
from ropo_ray.adapters.ropo_linear import release, share_rotations
from ropo_ray.config.schema import AdapterConfig

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [3, 3, 8, 1, 0, 6, 12, 9]])
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")  # two shapes: 64 wide (8 layers), 128 (2)


def adapted(model, seed=3):
    inject_ropo(model, AdapterConfig(target_modules=TARGETS))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in ropo_layers(model).values():
            for p in layer.rotation:
                p.normal_(0, 0.3)
            layer.magnitude.mul_(0.5 + torch.rand_like(layer.magnitude))
    return model


def unshared(model):
    """A copy whose layers never take shared coefficients."""
    other = copy.deepcopy(model)
    for layer in ropo_layers(other).values():
        layer._shareable = lambda: None
    return other


def loss_and_grads(model, passes=1):
    model.zero_grad(set_to_none=True)
    for _ in range(passes):
        logits = model(IDS).logits
        logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert torch.allclose(logits_a, logits_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("passes", [1, 2])
def test_shared_rotations_give_each_layers_own_values_and_gradients(tiny_llama, passes):
    """passes=2: gradients accumulated over two forwards (each forward batches anew: the first backward freed
    the first batch's graph) are twice one pass's. The backward drops the shared coefficients."""
    model = adapted(tiny_llama)
    shared = loss_and_grads(model, passes)
    assert all(layer._shared is None for layer in ropo_layers(model).values())
    assert_same(shared, loss_and_grads(unshared(model), passes))
    if passes == 2:
        single = loss_and_grads(model, 1)
        for name, grad in shared[1].items():
            assert torch.allclose(grad, 2 * single[1][name], rtol=1e-5, atol=1e-7), name


def test_shared_rotations_under_activation_checkpointing(tiny_llama):
    model = adapted(tiny_llama)
    reference = loss_and_grads(unshared(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_same(loss_and_grads(model), reference)


def test_one_coefficient_computation_per_group_per_forward(tiny_llama, monkeypatch):
    """10 adapted layers in two shapes, 3 factors each: one batched computation per shape per forward (2 calls
    holding 8 and 2 layers), not 10."""
    model = adapted(tiny_llama)
    calls = []
    real = ropo_linear.packed_coefficients
    monkeypatch.setattr(ropo_linear, "packed_coefficients",
                        lambda params, *a: calls.append([p.shape[0] for p in params]) or real(params, *a))
    with torch.no_grad():
        model(IDS)
    assert len(ropo_layers(model)) == 10
    assert sorted(calls) == [[2, 2, 2], [8, 8, 8]]
    assert all(layer._shared is None for layer in ropo_layers(model).values())  # no graph: dropped at once


def test_neumann_cayley_shares_through_the_composed_ops(tiny_llama, monkeypatch):
    """cayley=neumann has no native path: one batched composed Cayley per factor and shape (6 calls), not 30."""
    inject_ropo(tiny_llama, AdapterConfig(target_modules=TARGETS, cayley="neumann"))
    calls = []
    real = rot.cayley_neumann
    monkeypatch.setattr(rot, "cayley_neumann", lambda skew, terms: calls.append(skew.shape) or real(skew, terms))
    with torch.no_grad():
        tiny_llama(IDS)
    assert len(calls) == 6 and sorted(shape[0] for shape in calls) == [2, 2, 2, 8, 8, 8]


def test_a_layer_whose_parameters_changed_computes_its_own(tiny_llama):
    """Shared coefficients from before an in-place update (an optimizer step) are not used."""
    model = adapted(tiny_llama)
    layers = list(ropo_layers(model).values())
    share_rotations(layers)
    layer = layers[0]
    assert layer.coefficients() is layer._shared[0]
    with torch.no_grad():
        layer.rotation[1].add_(0.1)
    fresh = rot.pack_coefficients([rot.band_coefficients(q, b) for q, b in zip(layer.blocks(), layer._bands)])
    got = layer.coefficients()
    assert got is not layer._shared[0] and torch.allclose(got, fresh, atol=1e-6)
    assert not torch.equal(fresh, layer._shared[0])
    release(layers)


def test_coefficients_from_a_no_grad_forward_are_not_used_for_training(tiny_llama):
    model = adapted(tiny_llama)
    layers = list(ropo_layers(model).values())
    with torch.no_grad():
        share_rotations(layers)
    assert not layers[0]._shared[0].requires_grad
    assert layers[0].coefficients().requires_grad  # computed here, with a graph to the parameters
    release(layers)


def test_an_adapted_model_still_pickles(tiny_llama):
    """The forward hooks are module-level functions: torch.save of the whole model keeps working."""
    import io

    model = adapted(tiny_llama)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
