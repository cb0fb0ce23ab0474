"""`ropo-ray sweep`: Ray Tune over beta, block sizes and learning rate, every trial sharing one reference cache.

The Ray Train V2 pattern (STACK.md pitfall 7): each trial is a Tune driver function holding no
CPU (only a little logical memory) that builds and fits a TorchTrainer (`train_ray`) whose reports
reach Tune through `TuneReportCallback`; trials queue for their workers' CPUs instead of deadlocking.
Every trial reads one joined copy of the prepared pairs and the cached reference log-probs, so after
the cache stage the sweep loads no reference model and performs no reference forward. ASHA stops
weak trials on the held-out objective. An interrupted sweep resumes with `Tuner.restore`: finished
trials are kept, and an unfinished trial's TorchTrainer resumes from its own latest checkpoint. A
trial that crashes does not stop the sweep: it is reported (summary, log, results table) with the
root cause of its error, and the best configuration is chosen among the trials that completed.

Outputs under <run_dir>/sweep/<name>/: results.csv and results.parquet (one row per trial: its
values, status and final metrics), best.yaml (the best trial's full config, which `ropo-ray train`
accepts unchanged), and runs/<trial_id>/ (each trial's config, checkpoints, metrics and TensorBoard).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from ray import tune

from ropo_ray.config import save_config, with_overrides
from ropo_ray.config.schema import Config
from ropo_ray.fingerprint import hash_json
from ropo_ray.storage import Store, store
from ropo_ray.train.ray_trainer import read_metrics, total_steps, train_ray, training_datasets
from ropo_ray.tune.space import param_space, trial_overrides

OBJECTIVE_MODES = {"eval/loss": "min", "eval/rewards/accuracies": "max"}
METRIC = "eval/objective"  # tune.objective, penalised by the probe's KL and length growth when configured
# A trial's driver function. Even 0.01 CPU per driver would break the arithmetic: two drivers and two
# 1-CPU workers ask for 2.02 of 2 CPUs, and the second worker group waits until it times out. A bundle
# must hold some resource ({"CPU": 0} alone is refused), so the driver holds logical memory instead.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}
TABLE_METRICS = ("step", METRIC, "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "loss",
                 "rewards/accuracies", "grad_norm", "pairs_per_s", "tokens_per_s", "mfu", "orthogonality_error",
                 "eval/probe/kl", "eval/probe/length_ratio", "eval/probe/policy_length", "eval/probe/reference_length")


def sweep_name(cfg: Config, cache_key: str) -> str:
    """A hash of the search and of everything a trial trains with: the same sweep resumes, a changed one starts."""
    parts = {k: asdict(getattr(cfg, k)) for k in ("model", "adapter", "loss", "train", "data", "tune")}
    return f"sweep-{hash_json({**parts, 'cache': cache_key})[:12]}"


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The base config with a trial's values; every report then carries the held-out objective
    (reports every eval_every steps, checkpoints on evaluation steps), so ASHA compares like with like."""
    cfg = with_overrides(base, trial_overrides(values))
    every = cfg.train.eval_every
    checkpoint_every = every * max(1, math.ceil(cfg.train.checkpoint_every / every))
    return with_overrides(cfg, [f"train.log_every={every}", f"train.checkpoint_every={checkpoint_every}"])


def best_config(base: Config, values: dict[str, Any]) -> Config:
    """The config to train the winner with: the base and the trial's values, sweeping switched off."""
    cfg = with_overrides(base, trial_overrides(values))
    return replace(cfg, tune=replace(cfg.tune, enabled=False))


def max_concurrent_trials(cfg: Config) -> int:
    """Trials that fit at once: the cluster's CPUs (GPUs) over what one trial's workers ask for."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    tc, resources = cfg.train, ray.cluster_resources()
    if tc.use_gpu:
        return max(1, int(resources.get("GPU", 0) // tc.num_workers))
    return max(1, int(resources.get("CPU", 0) // (tc.num_workers * tc.cpus_per_worker)))


def trial_key(values: dict[str, Any]) -> str:
    """A trial's run folder name: a hash of its values, so the same configuration always trains in
    (and resumes from) the same folder."""
    return "t-" + hash_json(trial_overrides(values))[:12]


def finished_record(folder: Store, steps: int) -> dict[str, Any] | None:
    """The final record of a run in `folder` that trained all `steps` and checkpointed its export."""
    records = [r for r in read_metrics(folder.child("train_metrics.jsonl")) if r.get("step") == steps]
    return records[-1] if records and records[-1].get("checkpoint") else None


def _trial(values: dict[str, Any], base: Config, model_dir: str, cache_dir: str, prepared: str, runs_dir: str,
           datasets: dict[str, Any], steps: int) -> None:
    """One trial's driver: fit a TorchTrainer on the shared joined datasets, reporting to Tune.

    A configuration that already finished in this sweep is not trained again: its final record is
    reported as it is. Same values, same seed, same run: a grid repeated (num_samples > 1) or a value
    drawn twice costs nothing the second time.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, values)
    folder = Store(runs_dir).child(trial_key(values))
    done = finished_record(folder, steps)
    if done is not None:
        tune.report({k: v for k, v in done.items() if k not in ("time", "checkpoint")})
        return
    save_config(cfg, folder.child("config.yaml"))
    train_ray(cfg, Path(model_dir), cache_dir, prepared, folder, name="train",
              callbacks=[TuneReportCallback()], datasets=datasets)


def _search_alg(cfg: Config, metric: str, mode: str, concurrent: int) -> Any:
    """The search algorithm, limited to `concurrent` live trials (a trial's driver holds almost no CPU,
    so without the limit every trial would start and their workers would wait on each other)."""
    if cfg.tune.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:  # pragma: no cover - optuna ships with the test extra
            raise ImportError("tune.search=optuna needs the optuna package: pip install optuna") from err
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=cfg.tune.seed), concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrent)


def _scheduler(cfg: Config, steps: int) -> Any:
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = cfg.tune.grace_period or cfg.train.eval_every
    return ASHAScheduler(time_attr="step", max_t=steps, grace_period=min(grace, steps),
                         reduction_factor=cfg.tune.reduction_factor)


def _tuner(cfg: Config, trainable: Any, storage: Store, name: str, steps: int, log: Callable[[str], None]
           ) -> tune.Tuner:
    path = storage.child(name)
    if tune.Tuner.can_restore(path.path, storage_filesystem=storage.fs):
        log(f"sweep: resuming the interrupted sweep in {path} (finished trials are kept)")
        return tune.Tuner.restore(path.path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage.fs)
    metric, mode = METRIC, OBJECTIVE_MODES[cfg.tune.objective]
    concurrent = max_concurrent_trials(cfg)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=_search_alg(cfg, metric, mode, concurrent),
                                    scheduler=_scheduler(cfg, steps), num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage.path, storage_filesystem=storage.fs),
    )


STATUS_RANK = {"completed": 0, "stopped early": 1, "error": 2}
CAUSE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Corrupt)\b.*?: ")


def error_message(error: BaseException, limit: int = 300) -> str:
    """A trial's error in one line: its root cause, the last `SomeError: message` line of its text (a
    trial's error wraps Ray Train's, which wraps the worker's traceback), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if CAUSE.match(line)]
    return (causes[-1] if causes else lines[0] if lines else type(error).__name__)[:limit]


def results_rows(grid: Any, steps: int, searched: list[str]) -> list[dict[str, Any]]:
    """One row per configuration: trial id, its run folder, status (completed / stopped early / error),
    searched values and final metrics. A configuration Tune ran twice (see `_trial`) keeps its best row."""
    rows: dict[str, dict[str, Any]] = {}
    for result in grid:
        metrics = result.metrics or {}
        if result.error is not None:
            status = "error"
        elif metrics.get("step") == steps:
            status = "completed"
        else:
            status = "stopped early"
        values = {key: result.config.get(key) for key in searched}
        row = {"trial_id": metrics.get("trial_id", Path(result.path).name), "run": trial_key(values),
               "status": status, **values, **{key: metrics.get(key) for key in TABLE_METRICS},
               "error": None if result.error is None else error_message(result.error)}
        kept = rows.get(row["run"])
        if kept is None or STATUS_RANK[status] < STATUS_RANK[kept["status"]]:
            rows[row["run"]] = row
    return list(rows.values())


def pick_best(rows: list[dict[str, Any]], mode: str, key: str = METRIC) -> dict[str, Any]:
    """The best completed trial by its final `key` (a trial ASHA stopped early cannot win)."""
    sign = 1.0 if mode == "min" else -1.0
    candidates = [r for r in rows if r["status"] == "completed" and r.get(key) is not None]
    if not candidates:
        errors = [r["error"] for r in rows if r["error"]]
        raise RuntimeError(f"no sweep trial completed ({len(errors)} errored; first: {errors[:1]})")
    return min(candidates, key=lambda r: sign * r[key])


def penalties(cfg: Config) -> str:
    tc = cfg.tune
    return "".join(f" + {w} x {name}" for w, name in ((tc.kl_penalty, "KL"), (tc.length_penalty, "length growth")) if w)


def write_table(rows: list[dict[str, Any]], folder: Store) -> tuple[Store, Store]:
    table = pa.Table.from_pylist(rows)
    csv_path, parquet_path = folder.child("results.csv"), folder.child("results.parquet")
    pq.write_table(table, parquet_path.path, filesystem=folder.fs)
    with folder.fs.open_output_stream(csv_path.path) as f:
        pacsv.write_csv(table, f)
    return csv_path, parquet_path


def dashboard_url() -> str:
    try:
        return ray._private.worker.get_dashboard_url() or ""
    except Exception:  # noqa: BLE001 - the dashboard is optional; the sweep does not depend on it
        return ""


def run_sweep(cfg: Config, model_dir: Path, cache: dict[str, Any], prepared: str | Path | Store,
              log: Callable[[str], None] = print, trial: Callable[..., None] = _trial) -> dict[str, Any]:
    """Run (or resume) the sweep; write the results table and best.yaml; return a summary.

    `cache` is the cache stage's summary: its key names the sweep, its forward count is the sweep's
    (trials themselves load no reference model). `trial`: the driver function (benchmarks pass one
    that scores the reference itself first, as a sweep without a shared cache must).
    """
    t0 = time.perf_counter()
    prepared = store(prepared)
    steps = total_steps(prepared.child("manifest.json").read_json()["train"], cfg)
    storage = Store(cfg.pipeline.run_dir).child("sweep")
    name = sweep_name(cfg, cache["key"])
    folder = storage.child(name)
    datasets = training_datasets(cfg, cache["cache_dir"], prepared)  # joined once, read by every trial
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=cfg, model_dir=str(Path(model_dir).resolve()),
                             cache_dir=Store(cache["cache_dir"]).location, prepared=prepared.location,
                             runs_dir=folder.child("runs").location, datasets=datasets, steps=steps),
        DRIVER_RESOURCES)
    concurrent = max_concurrent_trials(cfg)
    log(f"sweep: {cfg.tune.search} search, {cfg.tune.num_samples} sample(s), {concurrent} trial(s) at once, "
        f"objective {cfg.tune.objective}{penalties(cfg)} ({OBJECTIVE_MODES[cfg.tune.objective]}), "
        f"{steps} steps per trial, scheduler {cfg.tune.scheduler} -> {folder}")
    url = dashboard_url()
    log(f"sweep: watch it on the Ray dashboard at {url or '<your cluster dashboard>'}, and the curves with "
        f"`tensorboard --logdir {folder.child('runs')}`")
    grid = _tuner(cfg, trainable, storage, name, steps, log).fit()
    searched = sorted(param_space(cfg))
    rows = results_rows(grid, steps, searched)
    csv_path, parquet_path = write_table(rows, folder)
    best = pick_best(rows, OBJECTIVE_MODES[cfg.tune.objective])
    best_yaml = folder.child("best.yaml")
    save_config(best_config(cfg, {k: best[k] for k in searched}), best_yaml)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("completed", "stopped early", "error")}
    failed = [{"trial_id": r["trial_id"], "values": {k: r[k] for k in searched}, "error": r["error"]}
              for r in rows if r["status"] == "error"]
    summary = {"folder": folder.location, "trials": len(rows), **counts, "failed": failed,
               "best_trial": best["trial_id"],
               "best_values": {k: best[k] for k in searched}, "best_objective": best[METRIC],
               "reference_forwards": cache["reference_forwards"], "results_csv": csv_path.location,
               "results_parquet": parquet_path.location, "best_yaml": best_yaml.location,
               "seconds": time.perf_counter() - t0}
    log(f"sweep: {len(rows)} trials ({counts['completed']} completed, {counts['stopped early']} stopped early by "
        f"ASHA, {counts['error']} errored) in {summary['seconds']:.0f} s; reference forwards during the sweep: "
        f"{cache['reference_forwards']} (cache {cache['key']}: {cache['reused']} of {cache['pairs']} pairs reused)")
    for trial in failed:
        log(f"sweep: trial {trial['trial_id']} failed ({trial_overrides(trial['values'])}): {trial['error']}")
    log(f"sweep: best {best['trial_id']} objective ({cfg.tune.objective}{penalties(cfg)})={best[METRIC]:.4f} with "
        f"{trial_overrides(summary['best_values'])}; train it with `ropo-ray train --config {best_yaml}`")
    return summary
