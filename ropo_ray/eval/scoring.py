"""Scoring samples through Ray Data actor pools: log-probs under policy and reference, and an optional
reward model.

One pass scores every run of an evaluation: its actor keeps the reference loaded throughout and each run's
policy while that run's rows stream through (until session 24, a pass per run loaded the reference again
each time); Ray Data shows its progress bars on the driver. Log-probs are summed over the completion tokens given the
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
    """Ray Data callable class: `policy_logp` and `reference_logp` of each row's `completion` given its
    `prompt`; the row's `run` names its policy.

    The reference stays loaded for the whole pass and scores each distinct (prompt, completion) once: the
    probes and held-out pairs every run is scored on cost it one forward, not one per run. Policies load as
    their rows arrive, one held at a time; the rows come grouped by run, so each loads once."""

    def __init__(self, reference: str, policies: dict[str, str], model_cfg: ModelConfig, micro_batch: int) -> None:
        from ropo_ray.train.model_io import load_model

        self.load = lambda path: load_model(path, model_cfg)
        self.reference = self.load(reference)
        self.policies = policies
        self.policy_name: str | None = None
        self.policy: Any = None
        self.policy_loads = 0
        self.micro_batch = micro_batch
        self.pad_id = self.reference.config.pad_token_id or 0
        self.reference_memo: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}

    def _logps(self, model: Any, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        sums = []
        for start in range(0, len(prompts), self.micro_batch):
            stop = start + self.micro_batch
            seqs = collate_sequences(prompts[start:stop], completions[start:stop], self.pad_id)
            logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], use_cache=False).logits
            sums.append(sequence_logps(logits.float(), seqs["input_ids"], seqs["completion_mask"])[0])
        return torch.cat(sums).double().tolist() if sums else []

    def _use_policy(self, name: str) -> Any:
        if name != self.policy_name:
            self.policy = None  # the previous policy goes before the next one loads
            self.policy, self.policy_name = self.load(self.policies[name]), name
            self.policy_loads += 1
        return self.policy

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [list(map(int, p)) for p in batch["prompt"]]
        completions = [list(map(int, c)) for c in batch["completion"]]
        runs = [str(r) for r in batch["run"]]
        keys = [(tuple(p), tuple(c)) for p, c in zip(prompts, completions)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.reference_memo))
        scored = self._logps(self.reference, [list(p) for p, _ in todo], [list(c) for _, c in todo])
        self.reference_memo.update(zip(todo, scored))
        policy = np.zeros(len(runs))
        for name in dict.fromkeys(runs):  # in order of first appearance
            rows = [i for i, r in enumerate(runs) if r == name]
            policy[rows] = self._logps(self._use_policy(name), [prompts[i] for i in rows],
                                       [completions[i] for i in rows])
        return {**batch, "policy_logp": policy, "reference_logp": np.array([self.reference_memo[k] for k in keys])}


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


def score_logps(rows: list[dict[str, Any]], reference: Path, policies: dict[str, Path], model_cfg: ModelConfig,
                batch_size: int, cpus: int = 1) -> list[dict[str, Any]]:
    """`rows` ({"run": a key of `policies`, "prompt": ids, "completion": ids, ...}) with `policy_logp` (under
    the row's run's policy) and `reference_logp`, in order: one Ray Data pass for every run, the reference
    loaded once. Rows should come grouped by run (each run's policy then loads once)."""
    import ray.data

    unknown = sorted({str(r["run"]) for r in rows} - set(policies))
    if unknown:
        raise ValueError(f"score_logps: rows name runs without a policy folder: {unknown}")
    indexed = [{**r, "_row": i} for i, r in enumerate(rows)]
    ds = ray.data.from_items(indexed)
    ds.context.execution_options.preserve_order = True  # rows stay grouped by run on their way to the actor
    ds = ds.map_batches(
        LogpScorer, fn_constructor_kwargs={"reference": str(reference),
                                           "policies": {k: str(v) for k, v in policies.items()},
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
