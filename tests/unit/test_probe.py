"""The sampled probe: the reference is the policy with its adapters off; KL and lengths checked against
models built independently (the original base model, the merged policy)."""

from __future__ import annotations

import copy

import pytest
import torch

from ropo_ray.adapters.inject import merge_ropo
from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config.schema import AdapterConfig
from ropo_ray.train.probe import adapters_disabled, answer_logps, probe, sample
from tests.conftest import make_tiny_llama
from tests.unit.test_ropo_layer import randomise_adapters

PROMPTS = [[5, 9, 3], [7, 2, 11, 4, 8], [3, 3], [12, 9, 1, 6]]
PAD, EOS = 0, 1


def logits(model, ids=((5, 9, 3, 7),)):
    return model(input_ids=torch.tensor(ids)).logits


def test_identity_adapters_give_zero_kl_and_equal_lengths():
    policy = attach_adapter(make_tiny_llama(), AdapterConfig())
    result = probe(policy, PROMPTS, PAD, EOS, max_new_tokens=12, seed=3)
    # the policy is the reference at step 0: the same samples (same seed), a log-ratio of 0
    assert abs(result["probe/kl"]) < 1e-5
    assert result["probe/length_ratio"] == 1.0


def test_kl_matches_the_merged_policy_against_the_untouched_base():
    base = make_tiny_llama()
    policy = attach_adapter(copy.deepcopy(base), AdapterConfig(target_modules=("q_proj", "v_proj", "up_proj")))
    randomise_adapters(policy, scale=0.5)
    result = probe(policy, PROMPTS, PAD, EOS, max_new_tokens=12, seed=3)
    merged = merge_ropo(copy.deepcopy(policy))
    with torch.no_grad():
        answers = sample(merged, PROMPTS, PAD, EOS, 12, seed=3)  # the merged model samples what the policy did
        ratio = answer_logps(merged, PROMPTS, answers, PAD) - answer_logps(base, PROMPTS, answers, PAD)
        reference_answers = sample(base, PROMPTS, PAD, EOS, 12, seed=3)
    assert result["probe/kl"] == pytest.approx(float(ratio.mean()), abs=1e-4)
    assert abs(result["probe/kl"]) > 1e-3  # the rotation really moved the policy
    assert result["probe/policy_length"] == sum(map(len, answers)) / len(PROMPTS)
    assert result["probe/reference_length"] == sum(map(len, reference_answers)) / len(PROMPTS)


def test_answers_are_cut_after_the_first_eos():
    from ropo_ray.train.probe import _answers

    sequences = torch.tensor([[0, 5, 6, 1, 7, 0], [4, 5, 9, 9, 9, 9]])
    assert _answers(sequences, 2, EOS) == [[6, 1], [9, 9, 9, 9]]


def test_adapters_disabled_is_the_base_and_restores():
    base = make_tiny_llama()
    policy = attach_adapter(copy.deepcopy(base), AdapterConfig())
    randomise_adapters(policy)
    with torch.no_grad():
        adapted = logits(policy)
        with adapters_disabled(policy):
            assert torch.equal(logits(policy), logits(base))
        assert torch.equal(logits(policy), adapted) and not torch.allclose(adapted, logits(base))


def test_peft_adapters_switch_off_and_full_training_is_refused():
    base = make_tiny_llama()
    lora = attach_adapter(copy.deepcopy(base), AdapterConfig(type="lora"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        assert not torch.allclose(logits(lora), logits(base))
        with adapters_disabled(lora):
            assert torch.allclose(logits(lora), logits(base), atol=1e-6)
    full = attach_adapter(copy.deepcopy(base), AdapterConfig(type="full"))
    with pytest.raises(ValueError, match="adapter.type=full"), adapters_disabled(full):
        pass
