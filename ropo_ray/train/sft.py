"""Supervised fine-tuning of the tiny demo Llama, and its evaluation. torch + transformers only.

One plain single-process loop (nanoGPT style): AdamW, linear warmup then cosine decay, loss on
completion tokens only, batches grouped by length so little compute goes to padding. Sequences are
built with `ropo_ray.data.tokenize` exactly as the reference cache and preference training build
them, so the SFT model is trained on the very token ids it is later scored on.

Precision: fp32. On the 2-core Zen 4 machines bf16 autocast was measured slower for a model this
small (34 ms vs 42 ms per step at batch 16, 45 vs 57 ms at batch 32): the casts cost more than the
narrower matmuls save. Small batches win for the same reason: a step's fixed overhead dominates, and
the arithmetic needs many optimizer steps to generalise (batch 16 reached about twice the held-out
accuracy of batch 64 in the same wall time).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ropo_ray.config.schema import TaskConfig
from ropo_ray.data.task import TaskData, probe_correct, verify
from ropo_ray.data.tokenize import encode_example, encode_prompt
from ropo_ray.train.logprobs import collate_sequences, sequence_logps
from ropo_ray.train.schedule import warmup_cosine_scheduler

Example = tuple[list[int], list[int]]  # (prompt ids, completion ids ending with eos)


def build_model(cfg: TaskConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama sized by `cfg`, its vocabulary and special ids from `tokenizer`.

    Embeddings are tied to the LM head: with a ~500-token vocabulary the untied head would be
    parameters with little to learn, and vLLM and transformers both load tied Llamas as they are.
    """
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_sft(tokenizer, rows: Sequence[dict]) -> list[Example]:
    """SFT rows ({"messages": [user, assistant]}) -> (prompt ids, completion ids)."""
    return [encode_example(tokenizer, r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length examples: sort within random chunks of 32 batches, then
    shuffle the batch order, so padding stays small without a fixed length order across epochs."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / completion_mask [B, T] of (prompt, completion) examples."""
    return collate_sequences([p for p, _ in examples], [c for _, c in examples], pad_id)


def completion_nll(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed NLL of each row's completion tokens, shape [B] (token t is predicted from logits t-1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    return -sequence_logps(logits, batch["input_ids"], batch["completion_mask"])[0]


def train_sft(model: LlamaForCausalLM, examples: list[Example], cfg: TaskConfig,
              log: Callable[[str], None] = print) -> dict:
    """Train in place; returns per-epoch mean loss (nats per completion token), steps and seconds."""
    rng = random.Random(f"ropo-sft-{cfg.seed}")
    lengths = [len(p) + len(c) for p, c in examples]
    steps_per_epoch = math.ceil(len(examples) / cfg.sft_batch_size)
    total = steps_per_epoch * cfg.sft_epochs
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices, incl. the tied embedding
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.sft_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.sft_lr, betas=(0.9, 0.98))
    sched = warmup_cosine_scheduler(opt, total, cfg.sft_warmup_ratio, floor=0.1)
    pad_id = model.config.pad_token_id
    epoch_losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for epoch in range(cfg.sft_epochs):
        loss_sum, token_sum = 0.0, 0
        for batch_ids in length_batches(lengths, cfg.sft_batch_size, rng):
            batch = collate([examples[i] for i in batch_ids], pad_id)
            tokens = int(batch["completion_mask"].sum())
            loss = completion_nll(model, batch).sum() / tokens
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum, token_sum = loss_sum + loss.item() * tokens, token_sum + tokens
        epoch_losses.append(loss_sum / token_sum)
        log(f"sft epoch {epoch + 1}/{cfg.sft_epochs}: loss {epoch_losses[-1]:.4f} "
            f"({time.perf_counter() - start:.1f} s)")
    model.eval()
    return {"epoch_losses": epoch_losses, "steps": total, "seconds": time.perf_counter() - start}


@torch.no_grad()
def generate(model: LlamaForCausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48,
             batch_size: int = 64) -> list[str]:
    """Greedy responses to single-turn `prompts` (batched, left-padded as HF generate needs)."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in chunk]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])  # [B, T]
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])  # [B, T]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokenizer, task: TaskData, batch_size: int = 64) -> dict:
    """Verifier accuracy on held-out prompts, probe accuracy, and the probes' mean summed NLL of the
    canonical answer (lower = the fact is held more firmly; this is what forgetting raises)."""
    model.eval()
    answers = generate(model, tokenizer, [h["prompt"] for h in task.heldout])
    probe_out = generate(model, tokenizer, [p["prompt"] for p in task.probes])
    examples = [encode_example(tokenizer, p["prompt"], p["response"]) for p in task.probes]
    nll = torch.cat([completion_nll(model, collate(examples[i:i + batch_size], tokenizer.pad_token_id))
                     for i in range(0, len(examples), batch_size)])  # [num_probes]
    return {
        "verifier_accuracy": sum(verify(h, a) for h, a in zip(task.heldout, answers)) / len(answers),
        "probe_accuracy": sum(probe_correct(p, a) for p, a in zip(task.probes, probe_out)) / len(probe_out),
        "probe_nll": float(nll.mean()),
        "mean_response_chars": sum(len(a) for a in answers) / len(answers),
        "samples": [{"prompt": h["prompt"], "response": a} for h, a in zip(task.heldout[:4], answers)],
    }
