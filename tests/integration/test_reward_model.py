"""The optional reward model: any HF sequence-classification folder, scored through a Ray Data actor pool.

Expected scores come from the same folder scored one text at a time with plain transformers (no padding),
so the batched, padded pass must find each sequence's last real token exactly as an unpadded one does.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reward_folder(tiny_assets, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward-model")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets))
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_reward_scores_match_unbatched_transformers(ray_local, reward_folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ropo_ray.config.schema import ModelConfig
    from ropo_ray.eval.scoring import score_rewards

    rows = [{"prompt_text": f"What is {i} + {i}?", "text": "The answer is " + "very " * (i % 4) + f"{2 * i}."}
            for i in range(10)]
    got = score_rewards(rows, str(reward_folder), ModelConfig(), batch_size=4)

    tokenizer = AutoTokenizer.from_pretrained(str(reward_folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_folder)).eval()
    expected = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt_text"]},
                                              {"role": "assistant", "content": row["text"]}], tokenize=False)
        with torch.no_grad():
            expected.append(float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0]))
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(x, 4) for x in got)) > 5  # distinct texts, distinct scores: the order is kept
