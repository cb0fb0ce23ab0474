"""Typed configuration (frozen dataclasses) and its YAML / dotted-override loader."""

from ropo_ray.config.load import config_to_dict, load_config, parse_override, save_config, with_overrides
from ropo_ray.config.schema import (
    AdapterConfig,
    CacheConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    PipelineConfig,
    TaskConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "AdapterConfig", "CacheConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig",
    "PipelineConfig", "TaskConfig", "TrainConfig", "TuneConfig", "config_to_dict", "load_config",
    "parse_override", "save_config", "with_overrides",
]
