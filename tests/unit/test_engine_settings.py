"""The vLLM engine settings and Ray actor options of evaluation's sampling engines, per machine kind, and
which model folders may share an engine."""

from __future__ import annotations

import json
from pathlib import Path

from ropo_ray.config import load_config
from ropo_ray.eval.sampling import engine_key, engine_settings


def test_cpu_engines_run_eagerly_on_their_cpus() -> None:
    cfg = load_config(None, ["eval.cpus_per_engine=2", "eval.kv_cache_gib=3"]).eval
    settings = engine_settings(cfg)
    assert settings["engine_kwargs"]["enforce_eager"] is True
    assert settings["engine_kwargs"]["enable_prefix_caching"] is True
    assert settings["actor_options"] == {"num_cpus": 2, "runtime_env": {"env_vars": {
        "VLLM_CPU_KVCACHE_SPACE": "3", "OMP_NUM_THREADS": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}}


def test_gpu_engines_compile_and_take_a_gpu_per_tensor_parallel_rank() -> None:
    cfg = load_config(None, ["eval.use_gpu=true", "eval.tensor_parallel_size=2"]).eval
    settings = engine_settings(cfg)
    assert settings["engine_kwargs"]["enforce_eager"] is False
    assert settings["engine_kwargs"]["tensor_parallel_size"] == 2
    assert settings["actor_options"] == {"num_cpus": 1, "num_gpus": 2}


def test_an_explicit_enforce_eager_wins_on_either_machine() -> None:
    assert engine_settings(load_config(None, ["eval.enforce_eager=false"]).eval)[
        "engine_kwargs"]["enforce_eager"] is False
    assert engine_settings(load_config(None, ["eval.use_gpu=true", "eval.enforce_eager=true"]).eval)[
        "engine_kwargs"]["enforce_eager"] is True


def _folder(root: Path, name: str, config: dict, tokenizer: str = '{"model": "bpe"}') -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "transformers_version": "5"}))
    (folder / "tokenizer.json").write_text(tokenizer)
    (folder / "model.safetensors").write_bytes(name.encode())  # weights never count
    return folder


CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
          "_name_or_path": "/runs/a", "transformers_version": "5.19.0", "dtype": "float32"}


def test_folders_differing_in_weights_or_provenance_share_an_engine(tmp_path: Path) -> None:
    a = _folder(tmp_path, "a", CONFIG)
    b = _folder(tmp_path, "b", {**CONFIG, "_name_or_path": "/runs/b", "transformers_version": "5.20.0",
                                "dtype": "bfloat16"})
    assert engine_key(a) == engine_key(b)
    (a / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "name_or_path": "/a"}))
    (b / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "is_local": True,
                                                         "local_files_only": False}))
    assert engine_key(a) == engine_key(b)  # transformers' save of a tokenizer loaded from a folder


def test_a_different_shape_tokenizer_or_generation_setting_needs_its_own_engine(tmp_path: Path) -> None:
    a = _folder(tmp_path, "a", CONFIG)
    deeper = _folder(tmp_path, "deeper", {**CONFIG, "num_hidden_layers": 3})
    retokenized = _folder(tmp_path, "retokenized", CONFIG, tokenizer='{"model": "unigram"}')
    other_eos = _folder(tmp_path, "other_eos", CONFIG)
    (other_eos / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    no_generation_config = _folder(tmp_path, "bare", CONFIG)
    (no_generation_config / "generation_config.json").unlink()
    keys = [engine_key(f) for f in (a, deeper, retokenized, other_eos, no_generation_config)]
    assert len(set(keys)) == len(keys)
