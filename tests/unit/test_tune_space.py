"""The sweep's search space, its overrides, the per-trial config and the choice of the best trial."""

from __future__ import annotations

import math

import pytest
from ray.tune.search.variant_generator import generate_variants

from ropo_ray.config import load_config
from ropo_ray.tune.space import param_space, trial_overrides
from ropo_ray.tune.sweep import best_config, pick_best, trial_config


def test_overrides_from_values_build_the_trial_config():
    values = {"adapter.block_sizes": "2,4", "train.lr": 0.003, "loss.beta": 0.1, "loss.type": "ipo",
              "adapter.target_modules": "q_proj,v_proj"}
    assert trial_overrides(values) == ["adapter.block_sizes=[2,4]", "adapter.target_modules=[q_proj,v_proj]",
                                       "loss.beta=0.1", "loss.type=ipo", "train.lr=0.003"]
    cfg = trial_config(load_config(None, ["train.eval_every=4", "train.checkpoint_every=10"]), values)
    assert cfg.adapter.block_sizes == (2, 4) and cfg.adapter.target_modules == ("q_proj", "v_proj")
    assert cfg.loss.type == "ipo" and cfg.loss.beta == 0.1 and cfg.train.lr == 0.003
    # every report carries the held-out objective: reports every 4 steps, checkpoints at 12 (first multiple >= 10)
    assert cfg.train.log_every == 4 and cfg.train.checkpoint_every == 12
    best = best_config(load_config(None, ["tune.enabled=true", "train.log_every=3"]), values)
    assert not best.tune.enabled and best.train.log_every == 3 and best.adapter.block_sizes == (2, 4)


def test_grid_expands_to_the_product_of_the_lists():
    cfg = load_config(None, ["tune.search=grid", "tune.lr_values=[0.01,0.001]", "tune.beta_values=[0.1,0.2,0.5]",
                             "tune.block_size_choices=[[2],[2,4]]", "tune.adapter_types=[ropo,lora]"])
    variants = [v for _, v in generate_variants(param_space(cfg))]
    assert len(variants) == 2 * 3 * 2 * 2
    assert {(v["train.lr"], v["loss.beta"], v["adapter.block_sizes"], v["adapter.type"]) for v in variants} == {
        (lr, b, bs, a) for lr in (0.01, 0.001) for b in (0.1, 0.2, 0.5) for bs in ("2", "2,4")
        for a in ("ropo", "lora")}


def test_random_space_samples_inside_the_ranges():
    cfg = load_config(None, ["tune.beta_range=[0.05,0.5]", "tune.lr_range=[1e-4,1e-2]"])
    space = param_space(cfg)
    for _ in range(50):
        beta, lr = space["loss.beta"].sample(), space["train.lr"].sample()
        assert 0.05 <= beta <= 0.5 and 1e-4 <= lr <= 1e-2
        assert space["adapter.block_sizes"].sample() in {"2", "4", "2,4", "2,4,8"}


def test_optuna_takes_the_same_space():
    from ray.tune.search.optuna import OptunaSearch

    cfg = load_config(None, ["tune.search=optuna", "tune.loss_types=[dpo,ipo]"])
    searcher = OptunaSearch(metric="eval/loss", mode="min", seed=0)
    assert searcher.set_search_properties("eval/loss", "min", param_space(cfg))
    values = searcher.suggest("trial-0")
    assert set(values) == {"loss.beta", "train.lr", "adapter.block_sizes", "loss.type"}
    assert math.log(0.05) <= math.log(values["loss.beta"]) <= math.log(0.5)


def test_grid_needs_explicit_values():
    with pytest.raises(ValueError, match="tune.search: a grid needs explicit"):
        load_config(None, ["tune.search=grid"])


def test_best_is_the_best_completed_trial():
    rows = [{"trial_id": "a", "status": "completed", "eval/loss": 0.30, "error": None},
            {"trial_id": "b", "status": "stopped early", "eval/loss": 0.10, "error": None},
            {"trial_id": "c", "status": "completed", "eval/loss": 0.25, "error": None},
            {"trial_id": "d", "status": "error", "eval/loss": None, "error": "boom"}]
    assert pick_best(rows, "min", "eval/loss")["trial_id"] == "c"  # b looked better, but ASHA stopped it early
    acc = [{**r, "eval/objective": v} for r, v in zip(rows, (0.7, 0.9, 0.8, None))]
    assert pick_best(acc, "max")["trial_id"] == "c"  # maximised
    with pytest.raises(RuntimeError, match="no sweep trial completed"):
        pick_best([rows[1], rows[3]], "min", "eval/loss")


def test_objective_penalises_kl_and_length_growth():
    from ropo_ray.train.probe import penalised_objective

    record = {"eval/loss": 0.40, "eval/rewards/accuracies": 0.80, "eval/probe/kl": 2.0,
              "eval/probe/length_ratio": 1.5}
    plain = load_config(None, []).tune
    assert penalised_objective(record, plain) == 0.40
    cfg = load_config(None, ["train.probe_prompts=4", "tune.kl_penalty=0.1", "tune.length_penalty=0.2"]).tune
    assert penalised_objective(record, cfg) == pytest.approx(0.40 + 0.1 * 2.0 + 0.2 * 0.5)
    shorter = {**record, "eval/probe/length_ratio": 0.7}  # shorter answers than the reference: no penalty
    assert penalised_objective(shorter, cfg) == pytest.approx(0.40 + 0.2)
    acc = load_config(None, ["train.probe_prompts=4", "tune.objective=eval/rewards/accuracies",
                             "tune.kl_penalty=0.1"]).tune
    assert penalised_objective(record, acc) == pytest.approx(0.80 - 0.2)
