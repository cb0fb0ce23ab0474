"""The built-in task, its tokenizer and the sequence construction: fast, no model training.

Expected values are worked out here from the prompts' own text (a regex and Python arithmetic),
never read back from the generator.
"""

from __future__ import annotations

import re
import statistics

import pytest

from ropo_ray.config.schema import ConfigError, TaskConfig
from ropo_ray.data.task import (
    FILLER_PREFIXES,
    FILLER_SUFFIXES,
    extract_answer,
    generate_task,
    probe_correct,
    verify,
    write_task,
)
from ropo_ray.data.tokenize import encode_completion, encode_prompt
from ropo_ray.data.tokenizer import CHAT_TEMPLATE, train_tokenizer

FILLERS = FILLER_PREFIXES + FILLER_SUFFIXES


def _problem(prompt: str) -> tuple[int, str, int]:
    a, op, b = re.search(r"(\d+) ([+-]) (\d+)", prompt).groups()
    return int(a), op, int(b)


def _value(problem: tuple[int, str, int]) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def _user_texts(task) -> list[str]:
    return [row["messages"][0]["content"] for row in task.sft]


@pytest.fixture(scope="module")
def task():
    return generate_task(TaskConfig())


@pytest.fixture(scope="module")
def tokenizer(task):
    return train_tokenizer([m["content"] for row in task.sft for m in row["messages"]], 512)


def test_same_seed_same_data_other_seed_other_data():
    small = dict(num_sft_examples=300, num_pairs=50, num_entities=8, num_heldout_prompts=20)
    a, b = generate_task(TaskConfig(seed=7, **small)), generate_task(TaskConfig(seed=7, **small))
    c = generate_task(TaskConfig(seed=8, **small))
    assert a == b
    assert a.sft != c.sft and a.pairs != c.pairs and a.heldout != c.heldout and a.entities != c.entities


def test_extract_and_verify_by_hand():
    assert extract_answer("The answer is 19.") == 19
    assert extract_answer("7 + 12 = 19.") == 19
    assert extract_answer("19") == 19
    assert extract_answer("Sure! Let me work through this carefully. It is 5. I hope this helps!") == 5
    assert extract_answer("It is -3.") == -3
    assert extract_answer("I hope this helps") is None
    assert verify({"prompt": "What is 7 + 12?", "answer": 19}, "7 + 12 = 19.")
    assert not verify({"prompt": "What is 7 + 12?", "answer": 19}, "It is 18.")
    assert not verify({"prompt": "What is 7 + 12?", "answer": 19}, "")
    assert probe_correct({"prompt": "Where does Zorvak live?", "answer": "Tarnell"}, "Zorvak lives in Tarnell.")
    assert not probe_correct({"prompt": "Where does Zorvak live?", "answer": "Tarnell"}, "Zorvak lives in Tarnellwick.")


def test_filler_has_no_digits():
    assert not any(re.search(r"\d", text) for text in FILLERS)


def test_chosen_correct_rejected_wrong(task):
    cfg = TaskConfig()
    assert len(task.pairs) == cfg.num_pairs
    for pair in task.pairs:
        truth = {"answer": _value(_problem(pair["prompt"]))}
        assert verify(truth, pair["chosen"]), pair
        assert not verify(truth, pair["rejected"]), pair
        assert extract_answer(pair["rejected"]) >= 0


def test_verbosity_confound(task):
    chosen_verbose = statistics.mean(any(f in p["chosen"] for f in FILLERS) for p in task.pairs)
    rejected_verbose = statistics.mean(any(f in p["rejected"] for f in FILLERS) for p in task.pairs)
    # 1200 Bernoulli(0.75) draws: standard deviation 0.0125, so 0.05 is four of them.
    assert abs(chosen_verbose - 0.75) < 0.05 and abs(rejected_verbose - 0.25) < 0.05
    chosen_chars = statistics.mean(len(p["chosen"]) for p in task.pairs)
    assert chosen_chars > statistics.mean(len(p["rejected"]) for p in task.pairs)


def test_sft_filler_is_a_minority(task):
    answers = [row["messages"][1]["content"] for row in task.sft if re.search(r"\d", row["messages"][0]["content"])]
    assert len(answers) == TaskConfig().num_sft_examples
    assert abs(statistics.mean(any(f in a for f in FILLERS) for a in answers) - 0.2) < 0.03
    assert len({re.sub(r"\d+", "N", a) for a in answers if not any(f in a for f in FILLERS)}) >= 4  # phrasings


def test_sft_answers_are_correct(task):
    for row in task.sft:
        user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
        if re.search(r"\d", user):
            assert extract_answer(assistant) == _value(_problem(user))


def test_heldout_combinations_are_unseen(task):
    heldout = [_problem(h["prompt"]) for h in task.heldout]
    assert len(set(heldout)) == len(heldout) == TaskConfig().num_heldout_prompts
    assert all(h["answer"] == _value(p) for h, p in zip(task.heldout, heldout))
    seen = {_problem(u) for u in _user_texts(task) if re.search(r"\d", u)} | {_problem(p["prompt"]) for p in task.pairs}
    assert not set(heldout) & seen
    assert all(_value(p) >= 0 and max(p[0], p[2]) < TaskConfig().max_operand for p in set(heldout) | seen)


def test_no_entity_or_town_in_any_pair(task):
    names = task.entities + task.towns
    assert len(task.entities) == TaskConfig().num_entities and len(set(names)) == len(names)
    sft_text = "\n".join(m["content"] for row in task.sft for m in row["messages"])
    pair_text = "\n".join(p["prompt"] + "\n" + p["chosen"] + "\n" + p["rejected"] for p in task.pairs)
    for name in names:
        assert name in sft_text  # the check below would be vacuous for a name the corpus never uses
        assert not re.search(rf"\b{name}\b", pair_text, flags=re.IGNORECASE), name


def test_every_probe_is_taught_by_the_sft_corpus(task):
    taught = {(row["messages"][0]["content"], row["messages"][1]["content"]) for row in task.sft}
    assert len(task.probes) == 4 * TaskConfig().num_entities
    for probe in task.probes:
        assert (probe["prompt"], probe["response"]) in taught
        assert probe_correct(probe, probe["response"])


def test_write_task(task, tmp_path):
    write_task(task, tmp_path)
    for name, rows in (("sft", task.sft), ("pairs", task.pairs), ("heldout", task.heldout), ("probes", task.probes)):
        assert len((tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()) == len(rows)


def test_config_rejects_too_many_heldout():
    with pytest.raises(ConfigError, match="num_heldout_prompts"):
        TaskConfig(max_operand=4, num_heldout_prompts=20)  # 16 sums + 10 differences = 26 problems


def test_tokenizer_round_trip(task, tokenizer):
    texts = [m["content"] for row in task.sft[:300] for m in row["messages"]] + [p["chosen"] for p in task.pairs[:50]]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_numbers_are_digit_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("It is 1234, not 56.", add_special_tokens=False))
    assert [t for t in tokens if re.search(r"\d", t)] == ["1", "2", "3", "4", "5", "6"]


def test_special_tokens_and_chat_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<|pad|>", "<|bos|>", "<|end|>")
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.chat_template == CHAT_TEMPLATE and len(loaded) == len(tokenizer) == 512
    chat = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "It is 3."}]
    expected = "<|bos|><|user|>\nWhat is 1 + 2?<|end|>\n<|assistant|>\nIt is 3.<|end|>\n"
    assert loaded.apply_chat_template(chat, tokenize=False) == expected
    assert loaded.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == \
        "<|bos|><|user|>\nWhat is 1 + 2?<|end|>\n<|assistant|>\n"


def test_sequence_construction(tokenizer):
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "What is 1 + 2?"}])
    completion = encode_completion(tokenizer, "It is 3.")
    sequence = prompt + completion
    assert sequence[0] == tokenizer.bos_token_id and sequence.count(tokenizer.bos_token_id) == 1
    assert sequence[-1] == tokenizer.eos_token_id and completion.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(prompt) == "<|bos|><|user|>\nWhat is 1 + 2?<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(completion) == "It is 3.<|end|>"
