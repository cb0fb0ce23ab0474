"""`ropo-ray train`: a Ray Train TorchTrainer of DeepSpeed workers over prepared pairs joined with the cache.

The driver joins the prepared pairs with the cached reference log-probs (Ray Data, by pair_id),
sizes the run, and fits a TorchTrainer whose workers run `ropo_ray.train.worker`. Checkpoints live
under <run_dir>/ray/<name>; running the same run again resumes from its latest checkpoint, and
FailureConfig restarts a group that lost a worker from there; a checkpoint or an export whose files
no longer match their integrity record is never trusted (ropo_ray.train.checkpoints). The final
checkpoint carries the export (merged HF folder + adapter weights + config), copied to <run_dir>/model.
The run folder may be an object-store URI: Ray Train writes the checkpoints there through the same
filesystem.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from ropo_ray.config.schema import Config
from ropo_ray.fingerprint import training_fingerprint
from ropo_ray.refcache.store import CACHE_SCHEMA, part_paths, verify
from ropo_ray.storage import Store, store
from ropo_ray.train.allocator import worker_env
from ropo_ray.train.checkpoints import CheckpointCorrupt, check_files, file_records, verify_resume_checkpoint
from ropo_ray.train.model_io import load_tokenizer
from ropo_ray.train.reports import latest, unpack
from ropo_ray.train.worker import train_loop_per_worker

PAIR_COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]
REF_COLUMNS = ["pair_id", "ref_chosen_logps", "ref_rejected_logps"]


class MetricsLog(UserCallback):
    """Appends rank 0's reported metrics to a JSON-lines file (Ray Train V2 keeps no metric history).

    Runs in the Ray Train controller; the file is the run's training curve for reports and tests. A report
    carries the step records the worker kept while a report would have waited (`ropo_ray.train.reports`):
    each becomes its own line, oldest first, with the time the worker made it; `report` numbers the reports
    this controller received, so the lines one report brought share it.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        self.reports = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.reports += 1
        *earlier, record = unpack(metrics[0])
        lines = [{"time": time.time(), **r, "report": self.reports, "checkpoint": None} for r in earlier]
        lines.append({"time": time.time(), **record, "report": self.reports,
                      "checkpoint": checkpoint.path if checkpoint else None})
        Store(self.location).append_lines([json.dumps(r) for r in lines])


def read_metrics(path: str | Path | Store) -> list[dict[str, Any]]:
    """The records a MetricsLog wrote, oldest first."""
    path = store(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


BLOCK_ROWS = 512


@contextmanager
def task_based_data_context() -> Iterator[None]:
    """Ray Data settings for the datasets created inside: tasks, never per-call actors.

    Ray 2.60's defaults start actors for small work, and a new actor is a new process (5-8 s of CPU
    for its imports on 2 cores):
    - its V2 Parquet reader starts 32 footer-reading actors for every read_parquet, whatever the number
      of files (3.4-5.6 s a read against 0.15-0.2 s for the V1 reader; one 200-pair file). V1 samples a
      few files' metadata in tasks, which reuse pooled workers;
    - its SHUFFLE_V2 strategy runs a sort and a repartition through aggregator actors (13.6-14.4 s
      for both on 20,000 pairs, against 1.2-1.5 s pull-based: a sample, a map and a reduce in tasks).
    (benchmarks/BENCHMARKS.md, "Session 11: the join before training".) A dataset copies the current DataContext
    when it is created, and what is derived from it keeps that copy, so the global one is restored after."""
    from ray.data.context import ShuffleStrategy

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2, context.shuffle_strategy
    context.use_datasource_v2, context.shuffle_strategy = False, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        context.use_datasource_v2, context.shuffle_strategy = previous


def _attach_reference(batch: pa.Table, reference: ray.ObjectRef) -> pa.Table:
    """Prepared pairs with their cached reference log-probs: each pair_id looked up in the broadcast
    cache columns (read from the object store without a copy). A pair the cache lacks is dropped here
    and counted by `joined_dataset`."""
    import pyarrow.compute as pc

    reference = ray.get(reference)
    where = pc.index_in(batch.column("pair_id"), value_set=reference.column("pair_id"))
    found = pc.is_valid(where)
    batch, where = batch.filter(found), where.filter(found)
    for name in REF_COLUMNS[1:]:
        batch = batch.append_column(name, reference.column(name).take(where))
    return batch


def cache_reference(cache_dir: str | Path | Store) -> ray.ObjectRef:
    """The verified cache's pair ids and two reference log-probs as one table in the object store."""
    cache_dir = store(cache_dir)
    tables = [pq.read_table(path, columns=REF_COLUMNS, filesystem=cache_dir.fs)
              for path in part_paths(cache_dir, verify(cache_dir))]
    return ray.put(pa.concat_tables(tables) if tables else CACHE_SCHEMA.empty_table().select(REF_COLUMNS))


def joined_dataset(prepared: str | Path | Store, cache_dir: str | Path | Store, split: str,
                   read_blocks: int | None = None, reference: ray.ObjectRef | None = None
                   ) -> tuple[ray.data.Dataset, int]:
    """Prepared pairs of `split` joined with the cache by pair_id (materialised), and the row count.

    A broadcast join: the cache's pair ids and two log-probs (about 40 bytes a pair, so 40 MB for a
    million; `reference`, from `cache_reference` when the caller joins several splits) are read once by
    the driver, put in the object store, and looked up for each block of the prepared pairs in a map
    task, so the token ids (most of the bytes) go through no shuffle. It replaced Ray Data's hash join,
    whose aggregator actors made it 6x slower (BENCHMARKS.md).

    The rows come out in one order whatever the cluster's timing and however the files were read
    (`read_blocks`): sorted by pair_id (a content hash, so a pseudo-random order; prepare writes one
    file per dedup bucket, each sorted, so their concatenation is not), then split into equal blocks of
    at most about BLOCK_ROWS rows (a split repartition: sizes from the row count alone), kept in order;
    the sort's own block boundaries (random sampling) are undone by the repartition. Both matter: the
    batches (the local shuffle buffer fills block by block), the split between workers and the position
    a resumed run skips to follow the blocks.

    A pair without a cache entry is an error, never silently dropped from training.
    """
    prepared, cache_dir = store(prepared), store(cache_dir)
    parts = prepared.child(split).files(".parquet")
    if not parts:
        return ray.data.from_items([]), 0
    with task_based_data_context():
        pairs = ray.data.read_parquet([p.path for p in parts], filesystem=prepared.fs, columns=PAIR_COLUMNS,
                                      override_num_blocks=read_blocks)
    reference = cache_reference(cache_dir) if reference is None else reference
    expected = pairs.count()
    joined = (pairs.map_batches(_attach_reference, fn_kwargs={"reference": reference},
                                batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
              .sort("pair_id").repartition(max(1, math.ceil(expected / BLOCK_ROWS))))
    joined.context.execution_options.preserve_order = True
    joined = joined.materialize()
    found = joined.count()
    if found != expected:
        raise ValueError(f"{expected - found} of {expected} {split} pairs have no cached reference log-probs "
                         f"in {cache_dir}; run the cache stage")
    return joined, found


def total_steps(rows: int, cfg: Config) -> int:
    """Optimizer steps every worker takes: equal shards of rows // workers, micro-batches accumulated
    across epoch boundaries, capped by train.max_steps."""
    tc = cfg.train
    per_worker = rows // tc.num_workers
    if per_worker == 0:
        raise ValueError(f"{rows} training pairs cannot be split over train.num_workers={tc.num_workers}")
    steps = (tc.epochs * math.ceil(per_worker / tc.micro_batch_size)) // tc.grad_accum_steps
    return max(1, min(steps, tc.max_steps) if tc.max_steps else steps)


def training_datasets(cfg: Config, cache_dir: str | Path | Store, prepared: str | Path | Store) -> dict[str, Any]:
    """The train and eval splits joined with the cache (materialised), with their row counts.

    Built once by a driver and handed to every TorchTrainer that trains on them (a sweep's trials
    share one join; Ray Data work launched inside a trial would be held to the trial's tiny bundle).
    """
    reference = cache_reference(cache_dir)  # verified and read once for both splits
    train_ds, n_train = joined_dataset(prepared, cache_dir, "train", reference=reference)
    eval_ds, n_eval = joined_dataset(prepared, cache_dir, "eval", reference=reference)
    return {"train": train_ds, "eval": eval_ds, "n_train": n_train, "n_eval": n_eval}


class SharedDatasets:
    """The joined train and eval datasets, built on first use and then reused: the pipeline's main run and
    its baselines train on the same prepared pairs and cache, so they share one join (a run that is
    already finished and skipped never triggers it)."""

    def __init__(self, cfg: Config, cache_dir: str | Path | Store, prepared: str | Path | Store) -> None:
        self.cfg, self.cache_dir, self.prepared = cfg, cache_dir, prepared
        self._datasets: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self._datasets is None:
            self._datasets = training_datasets(self.cfg, self.cache_dir, self.prepared)
        return self._datasets


class FinishedRun:
    """What `train_ray` returns for a run whose export is already published (the fit is skipped)."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics
        self.checkpoint = None


def finished_export(run_dir: str | Path | Store, name: str, cfg: Config, log: Callable[[str], None] = print
                    ) -> FinishedRun | None:
    """The published export of run `name` made with these settings in run_dir/model, if complete
    (run.json is written after everything else) and every file still matches run.json's record."""
    marker = store(run_dir).child("model", "run.json")
    if not marker.is_file() or not marker.sibling("merged").is_dir():
        return None
    record = marker.read_json()
    if record.get("name") != name or record.get("fingerprint") != training_fingerprint(cfg):
        return None
    try:
        if not record.get("files"):
            raise CheckpointCorrupt(f"{marker}: no integrity record of the export's files")
        check_files(marker.parent(), record["files"], "export")
    except CheckpointCorrupt as err:
        log(f"train: {err}; not trusting the export, exporting it again from the final checkpoint")
        return None
    return FinishedRun(record["metrics"])


def train_ray(cfg: Config, model_dir: Path, cache_dir: str | Path | Store, prepared: str | Path | Store,
              run_dir: str | Path | Store, name: str = "train",
              log: Callable[[str], None] = print, callbacks: list[Any] | None = None,
              datasets: dict[str, Any] | SharedDatasets | None = None) -> Any:
    """Fit the TorchTrainer (resuming a run of the same name) and copy its export to run_dir/model.

    `datasets`: from `training_datasets` when the caller already joined them, or a `SharedDatasets`
    that joins them on first use."""
    tc = cfg.train
    run_dir = store(run_dir)
    finished = finished_export(run_dir, name, cfg, log)
    if finished is not None:
        log(f"train: {name} already finished; its export in {run_dir.child('model')} is up to date")
        return finished
    storage = run_dir.child("ray")
    verify_resume_checkpoint(storage.child(name), log)  # before any work: a corrupt checkpoint is refused
    if isinstance(datasets, SharedDatasets):
        datasets = datasets.get()
    datasets = datasets or training_datasets(cfg, cache_dir, prepared)
    train_ds, n_train, eval_ds, n_eval = (datasets[k] for k in ("train", "n_train", "eval", "n_eval"))
    steps = total_steps(n_train, cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or model_dir, cfg.model)
    backend = tc.backend if tc.backend != "auto" else ("nccl" if tc.use_gpu else "gloo")
    log(f"train: {n_train} pairs ({n_eval} held out), {tc.num_workers} workers x {tc.micro_batch_size} pairs, "
        f"ZeRO-{tc.zero_stage}, {backend}, {tc.allocator} allocator, {steps} steps; "
        f"checkpoints in {storage.child(name)}")
    metrics_log = run_dir.child(f"{name}_metrics.jsonl")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "model_dir": str(Path(model_dir).resolve()), "pad_id": tokenizer.pad_token_id,
                           "eos_id": tokenizer.eos_token_id,
                           "total_steps": steps, "tensorboard_dir": run_dir.child("tensorboard").location},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        torch_config=TorchConfig(backend=backend),
        datasets={"train": train_ds, "eval": eval_ds},
        run_config=RunConfig(name=name, storage_path=storage.path, storage_filesystem=storage.fs,
                             callbacks=[MetricsLog(metrics_log.location), *(callbacks or [])],
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             worker_runtime_env={"env_vars": {
                                 **worker_env(tc.allocator, os.environ.get("LD_PRELOAD", ""), tc.jemalloc_conf),
                                 "RAY_worker_niceness": str(tc.worker_niceness)}}),
    )
    result = trainer.fit()
    result.metrics = latest(result.metrics or {})  # the final record, not the earlier ones it carried
    if result.checkpoint is not None:
        relative = result.checkpoint.path[len(storage.path.rstrip("/")) + 1:]  # checkpoints live under storage
        export = storage.child(*relative.split("/"), "export")
        if export.is_dir():
            target = run_dir.child("model")
            scratch = target.scratch()
            scratch.copy_from(export)
            if metrics_log.is_file():  # the training curve travels with the model it made
                scratch.child("metrics.jsonl").copy_from(metrics_log)
            record = {"name": name, "fingerprint": training_fingerprint(cfg), "metrics": dict(result.metrics),
                      "files": file_records(scratch)}  # checked before the export is trusted again
            scratch.child("run.json").write_json(record)
            target.publish_from(scratch, "run.json")
            log(f"train: merged model and adapter weights in {target}")
    return result
