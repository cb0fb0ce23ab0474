"""`ropo-ray`: the pipeline's stages as subcommands.

    ropo-ray demo-model [--config YAML] [section.key=value ...]   build the built-in task's SFT model
    ropo-ray prepare    [--config YAML] [overrides ...]           Ray Data: validate + tokenise pairs
    ropo-ray cache      [--config YAML] [overrides ...]           Ray Data: reference log-probs, cached
    ropo-ray train      [--config YAML] [overrides ...]           Ray Train + DeepSpeed RoPO training
    ropo-ray sweep      [--config YAML] [overrides ...]           Ray Tune sweep sharing one reference cache
    ropo-ray evaluate   [--config YAML] [overrides ...]           vLLM samples of the runs and the reference; report
    ropo-ray show-config [--config YAML] [overrides ...]          print the effective configuration
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from ropo_ray.config import Config, ConfigError, config_to_dict, load_config
from ropo_ray.data.sources import InputError


def cmd_show_config(cfg: Config) -> int:
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_demo_model(cfg: Config) -> int:
    from ropo_ray.runs import resolve_model, set_threads

    set_threads()
    resolve_model(cfg)
    return 0


def cmd_prepare(cfg: Config) -> int:
    from ropo_ray.runs import connect_ray, resolve_model, run_prepare

    model_dir = resolve_model(cfg)
    connect_ray()
    run_prepare(cfg, model_dir)
    return 0


def cmd_cache(cfg: Config) -> int:
    from ropo_ray.runs import connect_ray, resolve_model, run_cache, run_prepare

    model_dir = resolve_model(cfg)
    connect_ray()
    run_prepare(cfg, model_dir)  # a no-op when the prepared data is up to date
    run_cache(cfg, model_dir)
    return 0


def cmd_train(cfg: Config) -> int:
    from ropo_ray.runs import (
        connect_ray,
        prepared_dir,
        resolve_model,
        run_cache,
        run_prepare,
        run_store,
        train_run_name,
    )
    from ropo_ray.train.ray_trainer import train_ray

    model_dir = resolve_model(cfg)
    connect_ray()
    run_prepare(cfg, model_dir)
    cache = run_cache(cfg, model_dir)
    result = train_ray(cfg, model_dir, cache["cache_dir"], prepared_dir(cfg), run_store(cfg),
                       name=train_run_name(cfg, cache["key"]))
    print(yaml.safe_dump({"final_metrics": dict(result.metrics)}, sort_keys=False), end="")
    return 0


def cmd_sweep(cfg: Config) -> int:
    from ropo_ray.runs import connect_ray, prepared_dir, resolve_model, run_cache, run_prepare
    from ropo_ray.tune.sweep import run_sweep

    model_dir = resolve_model(cfg)
    connect_ray()
    run_prepare(cfg, model_dir)
    cache = run_cache(cfg, model_dir)
    summary = run_sweep(cfg, model_dir, cache, prepared_dir(cfg))
    print(yaml.safe_dump({"sweep": summary}, sort_keys=False), end="")
    return 0


def cmd_evaluate(cfg: Config) -> int:
    from ropo_ray.eval.evaluate import evaluate
    from ropo_ray.runs import connect_ray, prepared_dir, report_dir, resolve_model, run_store, tokenizer_dir
    from ropo_ray.storage import Store

    model_dir = resolve_model(cfg)
    connect_ray()
    exports = [Store(p) for p in cfg.eval.runs] or [run_store(cfg).child("model")]
    missing = [str(p) for p in exports if not p.child("merged").is_dir()]
    if missing:
        raise ConfigError(f"eval.runs: no exported run (merged/ folder) at {', '.join(missing)}; train first")
    evaluate(cfg, model_dir, tokenizer_dir(cfg, model_dir), exports, prepared_dir(cfg), report_dir(cfg))
    return 0


COMMANDS: dict[str, tuple[Callable[[Config], int], str]] = {
    "show-config": (cmd_show_config, "print the effective configuration as YAML"),
    "demo-model": (cmd_demo_model, "build (or reuse) the built-in task's tokenizer and tiny SFT model"),
    "prepare": (cmd_prepare, "validate, template and tokenise the preference pairs (Ray Data)"),
    "cache": (cmd_cache, "compute the reference log-probs into the shared cache (Ray Data actor pool)"),
    "train": (cmd_train, "prepare and cache if needed, then train on Ray Train with DeepSpeed workers"),
    "sweep": (cmd_sweep, "prepare and cache if needed, then a Ray Tune sweep of training runs sharing the cache"),
    "evaluate": (cmd_evaluate, "sample trained runs and the reference with vLLM, score them, write the report"),
}


def parse_args(argv: Sequence[str] | None = None, commands: Sequence[str] = tuple(COMMANDS)) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ropo-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in commands:
        p = sub.add_parser(name, help=COMMANDS[name][1])
        p.add_argument("--config", type=Path, default=None, help="YAML file of overrides")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return COMMANDS[args.command][0](cfg)
    except (ConfigError, InputError) as err:
        print(f"ropo-ray: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
