"""A sampled probe of reward hacking during training: KL to the reference and answer-length growth.

At each evaluation the policy answers a few held-out prompts, and so does the reference. Because the
adapters train on a frozen base that *is* the reference (RoPO, LoRA, OFT, BOFT), the reference is the
same model with its adapters switched off: no second model, and no reference log-prob from the cache
(these are new samples). Reported:

- kl: KL(policy || reference) estimated on the policy's samples y ~ pi(.|x) as the mean of
  log pi(y|x) - log pi_ref(y|x) (the unbiased "k1" estimator; Schulman, "Approximating KL divergence",
  2020), summed over the answer's tokens;
- policy_length, reference_length: mean sampled answer length in tokens (up to and including EOS),
  and their ratio, the "over-long answers" symptom DPO is known for (arXiv 2508.17637 section 1).

Torch only; `synced=True` keeps ranks in lockstep when ZeRO-3 shards the weights (every rank calls
generate and forward the same number of times).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ropo_ray.adapters.ropo_linear import RoPOLinear
from ropo_ray.config.schema import TuneConfig
from ropo_ray.train.logprobs import collate_sequences, sequence_logps

PROBE_KEYS = ("probe/kl", "probe/policy_length", "probe/reference_length", "probe/length_ratio")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes its frozen base, i.e. the reference policy."""
    ropo = [m for m in model.modules() if isinstance(m, RoPOLinear)]
    if ropo:
        for m in ropo:
            m.disabled = True
        try:
            yield
        finally:
            for m in ropo:
                m.disabled = False
        return
    disable = getattr(model, "disable_adapter", None)  # peft models: LoRA, OFT, BOFT
    if disable is None:
        raise ValueError("the probe needs an adapter on a frozen base (ropo, lora, oft, boft): with "
                         "adapter.type=full the reference is not inside the policy")
    with disable():
        yield


def _answers(sequences: torch.Tensor, prompt_width: int, eos_id: int) -> list[list[int]]:
    """Generated tokens after the (left-padded) prompts, cut after the first EOS."""
    answers = []
    for row in sequences[:, prompt_width:].tolist():
        answers.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return answers


def sample(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int, max_new_tokens: int,
           seed: int, synced: bool = False) -> list[list[int]]:
    """One sampled answer per prompt (temperature 1, full vocabulary), reproducible from `seed`."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])  # left padding
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=eos_id, synced_gpus=synced)
    finally:
        torch.random.set_rng_state(generator_state)
    return _answers(out, width, eos_id)


def answer_logps(model: nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
                 ) -> torch.Tensor:
    """Summed log-probs of each answer given its prompt, [N]."""
    batch = collate_sequences(prompts, answers, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits.float(), batch["input_ids"], batch["completion_mask"])[0]


@torch.no_grad()
def probe(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int, max_new_tokens: int,
          seed: int = 0, synced: bool = False) -> dict[str, float]:
    """KL(policy || reference) on policy samples and the mean answer lengths of both (see the module doc)."""
    was_training = model.training
    model.eval()
    try:
        policy_answers = sample(model, prompts, pad_id, eos_id, max_new_tokens, seed, synced)
        policy_logps = answer_logps(model, prompts, policy_answers, pad_id)
        with adapters_disabled(model):
            reference_logps = answer_logps(model, prompts, policy_answers, pad_id)
            reference_answers = sample(model, prompts, pad_id, eos_id, max_new_tokens, seed, synced)
    finally:
        model.train(was_training)
    policy_length = sum(map(len, policy_answers)) / len(prompts)
    reference_length = sum(map(len, reference_answers)) / len(prompts)
    return {"probe/kl": float((policy_logps - reference_logps).mean()), "probe/policy_length": policy_length,
            "probe/reference_length": reference_length, "probe/length_ratio": policy_length / reference_length}


def penalised_objective(record: dict[str, float], tune: TuneConfig) -> float:
    """The sweep's objective from an evaluation record: the held-out metric, made worse by
    kl_penalty * KL and by length_penalty * max(0, length ratio - 1) (added to a loss, subtracted
    from an accuracy)."""
    penalty = 0.0
    if tune.kl_penalty:
        penalty += tune.kl_penalty * record["eval/probe/kl"]
    if tune.length_penalty:
        penalty += tune.length_penalty * max(0.0, record["eval/probe/length_ratio"] - 1.0)
    value = record[tune.objective]
    return value + penalty if tune.objective == "eval/loss" else value - penalty
