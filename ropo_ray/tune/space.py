"""The sweep's search space, built from `TuneConfig`, and its mapping back to dotted config overrides.

Every searched value is a plain number or string (block sizes and module lists are joined with commas),
so random search, grid search and Optuna's categorical distributions all take the same space, and a
trial's config is the base config plus the overrides `trial_overrides` makes of its values.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ropo_ray.config.schema import Config

LIST_KEYS = ("adapter.block_sizes", "adapter.target_modules")


def _join(values: tuple) -> str:
    return ",".join(str(v) for v in values)


def _discrete(values: list[Any], grid: bool) -> Any:
    return tune.grid_search(values) if grid else tune.choice(values)


def _continuous(values: tuple[float, ...], bounds: tuple[float, float], grid: bool) -> Any:
    if values:
        return _discrete(list(values), grid)
    return tune.loguniform(bounds[0], bounds[1])


def param_space(cfg: Config) -> dict[str, Any]:
    """Dotted config key -> Tune domain, for the keys the sweep varies."""
    tc = cfg.tune
    grid = tc.search == "grid"
    space: dict[str, Any] = {
        "loss.beta": _continuous(tc.beta_values, tc.beta_range, grid),
        "train.lr": _continuous(tc.lr_values, tc.lr_range, grid),
        "adapter.block_sizes": _discrete([_join(c) for c in tc.block_size_choices], grid),
    }
    if tc.loss_types:
        space["loss.type"] = _discrete(list(tc.loss_types), grid)
    if tc.adapter_types:
        space["adapter.type"] = _discrete(list(tc.adapter_types), grid)
    if tc.target_module_choices:
        space["adapter.target_modules"] = _discrete([_join(c) for c in tc.target_module_choices], grid)
    return space


def trial_overrides(values: dict[str, Any]) -> list[str]:
    """A trial's sampled values as dotted overrides (`adapter.block_sizes=[2,4]`, `train.lr=0.003`)."""
    overrides = []
    for key in sorted(values):
        value = values[key]
        text = f"[{value}]" if key in LIST_KEYS else repr(value) if isinstance(value, float) else str(value)
        overrides.append(f"{key}={text}")
    return overrides


def searched_keys(cfg: Config) -> list[str]:
    return sorted(param_space(cfg))
