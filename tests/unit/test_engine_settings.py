"""The vLLM engine settings evaluation passes to Ray Data's processor, per machine kind."""

from __future__ import annotations

from ropo_ray.config import load_config
from ropo_ray.eval.sampling import engine_settings


def test_cpu_engines_run_eagerly_on_cpu_bundles() -> None:
    cfg = load_config(None, ["eval.cpus_per_engine=2", "eval.kv_cache_gib=3"]).eval
    settings = engine_settings(cfg, "/m")
    assert settings["engine_kwargs"]["enforce_eager"] is True
    assert settings["placement_group_config"] == {"bundles": [{"CPU": 2}]}
    assert settings["runtime_env"]["env_vars"] == {"VLLM_CPU_KVCACHE_SPACE": "3", "OMP_NUM_THREADS": "2"}


def test_gpu_engines_compile_and_take_a_gpu_bundle_per_tensor_parallel_rank() -> None:
    cfg = load_config(None, ["eval.use_gpu=true", "eval.tensor_parallel_size=2"]).eval
    settings = engine_settings(cfg, "/m")
    assert settings["engine_kwargs"]["enforce_eager"] is False
    assert settings["engine_kwargs"]["tensor_parallel_size"] == 2
    assert settings["placement_group_config"] == {"bundles": [{"CPU": 1, "GPU": 1}] * 2}
    assert "runtime_env" not in settings


def test_an_explicit_enforce_eager_wins_on_either_machine() -> None:
    assert engine_settings(load_config(None, ["eval.enforce_eager=false"]).eval, "/m")[
        "engine_kwargs"]["enforce_eager"] is False
    assert engine_settings(load_config(None, ["eval.use_gpu=true", "eval.enforce_eager=true"]).eval, "/m")[
        "engine_kwargs"]["enforce_eager"] is True
