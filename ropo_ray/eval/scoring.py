"""Scoring samples through Ray Data actor pools: log-probs under policy and reference, and an optional
reward model.

Each actor loads its models once and scores batches of rows; Ray Data streams the rows through the pool
and shows its progress bars on the driver. Log-probs are summed over the completion tokens given the
prompt, with the same masking as training (`ropo_ray.train.logprobs`), so an implicit reward computed
here is the one the loss optimised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ropo_ray.config.schema import ModelConfig
from ropo_ray.train.logprobs import collate_sequences, sequence_logps


class LogpScorer:
    """Ray Data callable class: `{name}_logp` of each row's `completion` given its `prompt`, per model."""

    def __init__(self, models: dict[str, str], model_cfg: ModelConfig, micro_batch: int) -> None:
        from ropo_ray.train.model_io import load_model

        self.models = {name: load_model(path, model_cfg) for name, path in models.items()}
        self.micro_batch = micro_batch
        self.pad_id = next(iter(self.models.values())).config.pad_token_id or 0

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [list(map(int, p)) for p in batch["prompt"]]
        completions = [list(map(int, c)) for c in batch["completion"]]
        out = dict(batch)
        for name, model in self.models.items():
            sums = []
            for start in range(0, len(prompts), self.micro_batch):
                stop = start + self.micro_batch
                seqs = collate_sequences(prompts[start:stop], completions[start:stop], self.pad_id)
                logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                               use_cache=False).logits
                sums.append(sequence_logps(logits.float(), seqs["input_ids"], seqs["completion_mask"])[0])
            out[f"{name}_logp"] = torch.cat(sums).double().numpy()  # [N]
        return out


class RewardScorer:
    """Ray Data callable class: `reward` of each row's (prompt text, response text) from an HF
    sequence-classification model (one label: its logit; two or more: the last label's log-odds)."""

    def __init__(self, path: str, model_cfg: ModelConfig) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _texts(self, batch: dict[str, np.ndarray]) -> list[str]:
        if getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(r)}], tokenize=False)
                for p, r in zip(batch["prompt_text"], batch["text"])]
        return [f"{p}\n{r}" for p, r in zip(batch["prompt_text"], batch["text"])]

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(self._texts(batch), return_tensors="pt", padding=True, truncation=True)
        logits = self.model(**enc).logits.float()  # [N, labels]
        reward = logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=1)
        return {**batch, "reward": reward.double().numpy()}


def score_logps(rows: list[dict[str, Any]], models: dict[str, Path], model_cfg: ModelConfig, batch_size: int,
                cpus: int = 1) -> list[dict[str, Any]]:
    """`rows` ({"prompt": ids, "completion": ids, ...}) with `{name}_logp` for every named model, in order."""
    import ray.data

    indexed = [{**r, "_row": i} for i, r in enumerate(rows)]
    ds = ray.data.from_items(indexed).map_batches(
        LogpScorer, fn_constructor_kwargs={"models": {k: str(v) for k, v in models.items()},
                                           "model_cfg": model_cfg, "micro_batch": batch_size},
        batch_size=batch_size * 4, concurrency=1, num_cpus=cpus, batch_format="numpy")
    return _in_order(ds.take_all())


def score_rewards(rows: list[dict[str, Any]], path: str, model_cfg: ModelConfig, batch_size: int,
                  cpus: int = 1) -> list[float]:
    """Reward-model score of each row ({"prompt_text", "text"}), in order."""
    import ray.data

    indexed = [{"prompt_text": r["prompt_text"], "text": r["text"], "_row": i} for i, r in enumerate(rows)]
    ds = ray.data.from_items(indexed).map_batches(
        RewardScorer, fn_constructor_kwargs={"path": path, "model_cfg": model_cfg}, batch_size=batch_size,
        concurrency=1, num_cpus=cpus, batch_format="numpy")
    return [float(r["reward"]) for r in _in_order(ds.take_all())]


def _in_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows.sort(key=lambda r: int(r["_row"]))
    for r in rows:
        del r["_row"]
    return rows
