"""One set of vLLM engines for every model of an evaluation: after a weight reload the engine samples
exactly what a freshly started engine on that model samples (same per-request seeds), token for token.

Two models of one architecture: the small demo model (A) and a copy with noise added to every matrix
but the embedding (B). The shared engines load A, B, A again, and a fresh engine on B gives B's expected
samples. B's samples differ from A's (the check has something to catch), and a reload that kept A's
weights, or kept A's keys and values in the prefix cache, would give A's samples or a mix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ropo_ray.config import load_config
from ropo_ray.data.tokenize import encode_prompt
from ropo_ray.eval.sampling import SamplingEngines, engine_key, sample_requests
from ropo_ray.train.demo_model import build_demo_model
from tests.integration.test_demo_model import SMALL

pytestmark = pytest.mark.integration
BLOCK = 128  # vLLM's KV-cache block on CPU (vllm/platforms/cpu.py)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    from ropo_ray.train.model_io import load_tokenizer

    root = tmp_path_factory.mktemp("engines")
    first = root / "a"
    build_demo_model(SMALL, first, log=lambda s: None)
    second = root / "b"
    model = AutoModelForCausalLM.from_pretrained(first)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(p.std() * torch.randn_like(p))
    model.save_pretrained(second)
    for f in first.iterdir():
        if f.is_file() and not f.name.startswith("model") and not (second / f.name).exists():
            shutil.copy(f, second / f.name)
    cfg = load_config(None, [])
    tokenizer = load_tokenizer(first, cfg.model)
    # Prompts longer than a KV-cache block (128 tokens on CPU), so that the prefix cache keeps whole
    # blocks of them; the last ones repeat earlier ones, whose blocks are then in the cache.
    prompts = []
    for i in range(8):
        text = f"what is {i} plus {i + 3}?"
        while len(encode_prompt(tokenizer, [{"role": "user", "content": text}])) <= BLOCK + 8:
            text += f" what is {i} plus {i + 3}?"
        prompts.append(encode_prompt(tokenizer, [{"role": "user", "content": text}]))
    return first, second, prompts + prompts[:4]


def test_models_differing_only_in_weights_share_an_engine_key(two_models) -> None:
    first, second, _ = two_models
    assert engine_key(first) == engine_key(second)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_a_reloaded_engine_samples_what_a_fresh_engine_samples(ray_local, two_models, eager) -> None:
    """Shared engines load A, B, then A again; B's samples must be a fresh engine's on B, and A's the same both
    times (the first load of A is itself a fresh start). Compiled engines (`eval.enforce_eager=false`, vLLM's
    torch.compile) too: a compiled graph that had captured A's weights as constants would keep sampling A."""
    first, second, prompts = two_models
    overrides = [f"eval.max_tokens={MAX_TOKENS}", f"eval.probe_max_tokens={MAX_TOKENS}", f"eval.enforce_eager={eager}"]
    cfg = load_config(None, overrides).eval
    rows = sample_requests(prompts, cfg, "sample", 3) + sample_requests(prompts[:4], cfg, "probe", 1, greedy=True)
    assert BLOCK < min(map(len, prompts)) and max(map(len, prompts)) + MAX_TOKENS <= cfg.max_model_len

    def tokens(out):
        assert [(r["kind"], r["prompt_index"], r["sample_index"]) for r in out] == \
            [(r["kind"], r["prompt_index"], r["sample_index"]) for r in rows]
        return [r["tokens"] for r in out]

    with SamplingEngines(cfg) as shared:
        got_a = tokens(shared.generate(first, rows))
        got_b = tokens(shared.generate(second, rows))
        again_a = tokens(shared.generate(first, rows))
        assert (shared.starts, shared.reloads) == (1, 2)
        assert shared.settings["engine_kwargs"]["enforce_eager"] is eager
    with SamplingEngines(load_config(None, [*overrides, "eval.share_engines=false"]).eval) as fresh:
        expected_b = tokens(fresh.generate(second, rows))
        assert (fresh.starts, fresh.reloads) == (1, 0)
    differing = sum(a != b for a, b in zip(got_a, expected_b))
    assert differing >= len(rows) // 2, f"only {differing} of {len(rows)} samples differ between the models"
    assert got_b == expected_b
    assert again_a == got_a
