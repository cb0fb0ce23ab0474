"""Integration tier: a local Ray with 2 CPUs, a tokenizer trained here and a tiny random Llama."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, its dashboard bound to this machine. The dashboard is needed:
    Ray Train V2 frees the workers' placement group of a trial Tune stopped (ASHA) through a cleaner
    that asks the dashboard's state API whether the trial's controller is alive; without it the
    group's CPUs stay reserved and the next trial's workers never start. Started as the pipeline starts
    its own (`start_local_ray`), so its workers know its address beside another Ray on this machine."""
    import ray

    from ropo_ray.runs import start_local_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A folder with a tokenizer (with chat template) and a tiny random Llama, as a user would have."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ropo_ray.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    corpus = ["What is 12 + 7? The answer is 19.", "Hello there, how are you today?", "Tell me a joke please."] * 20
    tokenizer = train_tokenizer(corpus, 320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def polite_data(ray_local, tiny_assets, tmp_path_factory):
    """Pairs sharing one learnable preference (a polite answer beats a rude one, so held-out pairs can be
    learnt), prepared and cached once. Returns (root, config overrides that point at them, cache dir)."""
    import json

    from ropo_ray.config import load_config
    from ropo_ray.data.prepare import prepare
    from ropo_ray.refcache.stage import build_cache

    root = tmp_path_factory.mktemp("polite")
    rows = [{"prompt": f"Question {i}: what is {i} + {i % 7}?", "chosen": "Thank you, happy to help.",
             "rejected": "No. Go away."} for i in range(200)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = [f"pipeline.run_dir={root}", f"cache.root={root}/cache", f"data.train_files=[{root}/pairs.jsonl]",
            "data.eval_fraction=0.2", "train.lr=0.03", "loss.beta=0.5", "train.epochs=2"]
    cfg = load_config(None, base)
    prepare(cfg, str(tiny_assets), root / "data", cfg.data.train_files)
    cache = build_cache(cfg, tiny_assets, tiny_assets, root / "data", log=lambda s: None)
    return root, base, cache["cache_dir"]
