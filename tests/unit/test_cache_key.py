"""The cache key changes with each field that changes the numbers, and with nothing else."""

from __future__ import annotations

import json

import pytest
import torch

from ropo_ray.config import load_config
from ropo_ray.refcache.store import cache_key, key_fields
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ropo_ray.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("ref")
    make_tiny_llama().save_pretrained(str(d))
    train_tokenizer(["hello world, what is 1 + 2?"] * 5, 280).save_pretrained(str(d))
    return d


def key(folder, overrides=()):
    cfg = load_config(None, list(overrides))
    return cache_key(key_fields(folder, folder, cfg.data, cfg.model))


def test_not_keyed_on_what_a_sweep_varies(folder):
    base = key(folder)
    for o in ("loss.beta=0.7", "train.lr=0.5", "adapter.block_sizes=[4]", "adapter.type=lora", "train.seed=9",
              "loss.type=ipo", "data.eval_fraction=0.3", "data.train_files=[other.jsonl]"):
        assert key(folder, [o]) == base, o


def test_keyed_on_truncation_and_dtype(folder):
    base = key(folder)
    for o in ("data.max_prompt_tokens=10", "data.max_completion_tokens=10", "data.truncation=reject",
              "model.dtype=bfloat16"):
        assert key(folder, [o]) != base, o


def test_keyed_on_weights_config_tokenizer_and_chat_template(folder, tmp_path):
    import shutil

    base = key(folder)
    variants = {}
    for name in ("weights", "config", "tokenizer", "template"):
        variants[name] = tmp_path / name
        shutil.copytree(folder, variants[name])
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    model.save_pretrained(str(variants["weights"]))
    cfg = json.loads((variants["config"] / "config.json").read_text())
    (variants["config"] / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    tok = json.loads((variants["tokenizer"] / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz-extra"] = 99999
    (variants["tokenizer"] / "tokenizer.json").write_text(json.dumps(tok))
    template_file = next(p for p in (variants["template"] / "chat_template.jinja",
                                     variants["template"] / "tokenizer_config.json") if p.exists())
    template_file.write_text(template_file.read_text().replace("<|end|>", "<|end|> "))
    keys = {name: key(d) for name, d in variants.items()}
    assert all(k != base for k in keys.values()), keys
    assert len(set(keys.values())) == 4
