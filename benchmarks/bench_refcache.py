"""Reference-logprob cache build: ropo-ray's Ray Data actor pool vs a plain single-process HF loop.

    python benchmarks/bench_refcache.py [--pairs 4800] [--repeats 3] [--out benchmarks/results/refcache.json]

Both sides score the same prepared pairs with the same model (the built-in task's SFT model, built or
reused under artifacts/) and produce the same numbers; they run one after the other in each repeat,
so the ratio compares like with like on a noisy machine. Reported: medians of pairs/s, their ratio,
and the tokens each side's batches computed per pair and their padding fraction (padding / computed).

The stage scores in the trainer's layout (train.shared_prompt): by default one row per pair, [prompt | chosen |
rejected], so each prompt runs once; the `stacked` variant (train.shared_prompt=false) runs chosen and rejected
as two rows, as the plain loop does.

The baseline is what a training script does without a cache stage: batches of `--batch` pairs in
file order, each pair's chosen and rejected padded to the batch's longest sequence, one forward per
batch. ropo-ray sorts by length and packs micro-batches by token budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch

from ropo_ray.config import load_config
from ropo_ray.refcache.compute import pair_width, rows_per_pair
from ropo_ray.refcache.stage import build_cache, token_budget_batches
from ropo_ray.runs import connect_ray, resolve_model, run_prepare
from ropo_ray.train.logprobs import collate_pairs, concatenated_forward
from ropo_ray.train.model_io import load_model, load_tokenizer


def batch_tokens(batches: list[list[dict]], shared_prompt: bool = False) -> dict[str, float]:
    """Tokens computed per pair (padding included) and the padding fraction (1 - real / computed) of batches
    padded to their widest row: [2B, T] stacked, [B, L] in the shared-prompt layout."""
    real = computed = pairs = 0
    for rows in batches:
        widths = [pair_width(r, shared_prompt) for r in rows]
        real += sum(len(r["prompt_ids"]) * rows_per_pair(shared_prompt) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                    for r in rows)  # the prompt once per row of the pair
        computed += rows_per_pair(shared_prompt) * len(rows) * max(widths)
        pairs += len(rows)
    return {"tokens_per_pair": computed / pairs, "padding_fraction": 1.0 - real / computed}


@torch.no_grad()
def plain_loop(model, rows: list[dict], pad_id: int, batch: int) -> float:
    """Seconds to score every row in file order, fixed-size batches (no cache stage, no bucketing)."""
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        concatenated_forward(model, collate_pairs([r["prompt_ids"] for r in chunk], [r["chosen_ids"] for r in chunk],
                                                  [r["rejected_ids"] for r in chunk], pad_id))
    return time.perf_counter() - t0


def write_pairs(model_dir: Path, out: Path, count: int) -> None:
    """`count` pairs: the built-in task's pairs, repeated with a numbered prefix so every pair is new."""
    base = [json.loads(x) for x in (model_dir / "task" / "pairs.jsonl").read_text().splitlines() if x.strip()]
    with out.open("w") as f:
        for i in range(count):
            row = base[i % len(base)]
            f.write(json.dumps({**row, "prompt": f"({i // len(base)}) {row['prompt']}"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/refcache.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-refcache-"))
    cfg = load_config(None, [f"pipeline.run_dir={work}/run", f"data.train_files=[{work}/pairs.jsonl]",
                             "data.eval_fraction=0.0"])
    model_dir = resolve_model(cfg)
    write_pairs(model_dir, work / "pairs.jsonl", args.pairs)
    connect_ray()
    run_prepare(cfg, model_dir)
    import pyarrow.dataset as pads

    rows = pads.dataset(str(work / "run" / "data" / "train"), format="parquet").to_table().to_pylist()
    model, tokenizer = load_model(model_dir, cfg.model), load_tokenizer(model_dir, cfg.model)
    torch.set_num_threads(2)
    variants = {"actors=1 x 2 CPU": ["cache.num_actors=1", "cache.cpus_per_actor=2"],
                "actors=2 x 1 CPU": ["cache.num_actors=2", "cache.cpus_per_actor=1"],
                "actors=2 x 1 CPU, stacked": ["cache.num_actors=2", "cache.cpus_per_actor=1",
                                              "train.shared_prompt=false"]}
    results: dict[str, list[float]] = {"plain HF loop": [], **{k: [] for k in variants}}
    inside: dict[str, list[float]] = {k: [] for k in variants}  # pairs/s inside the actors (forwards only)
    for _ in range(args.repeats):
        results["plain HF loop"].append(len(rows) / plain_loop(model, rows, tokenizer.pad_token_id, args.batch))
        for name, overrides in variants.items():
            root = work / "cache"
            shutil.rmtree(root, ignore_errors=True)
            vcfg = load_config(None, [f"pipeline.run_dir={work}/run", f"cache.root={root}", *overrides,
                                      f"data.train_files=[{work}/pairs.jsonl]", "data.eval_fraction=0.0"])
            summary = build_cache(vcfg, model_dir, model_dir, work / "run" / "data", log=lambda s: None)
            results[name].append(summary["pairs"] / summary["seconds"])
            actors = int(overrides[0].split("=")[1])
            inside[name].append(summary["pairs"] / (summary["actor_seconds"] / actors))
    medians = {k: statistics.median(v) for k, v in results.items()}
    budget = load_config().cache.token_budget
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": benchlib.machine(threads=torch.get_num_threads()),
        "pairs": len(rows), "repeats": args.repeats, "pairs_per_s": results, "median_pairs_per_s": medians,
        "ratio_vs_plain": {k: medians[k] / medians["plain HF loop"] for k in variants},
        "median_pairs_per_s_inside_actors": {k: statistics.median(v) for k, v in inside.items()},
        "shared_vs_stacked_inside_actors": {  # the same pool, one layout against the other, in each repeat
            "per_repeat": [s / t for s, t in zip(inside["actors=2 x 1 CPU"], inside["actors=2 x 1 CPU, stacked"])],
            "of_medians": statistics.median(inside["actors=2 x 1 CPU"])
            / statistics.median(inside["actors=2 x 1 CPU, stacked"])},
        "batch_tokens": {
            f"plain, file order, batch {args.batch}": batch_tokens(
                [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]),
            f"ropo-ray, stacked, length-sorted, token budget {budget}": batch_tokens(
                token_budget_batches(rows, budget)),
            f"ropo-ray, shared prompt, length-sorted, token budget {budget}": batch_tokens(
                token_budget_batches(rows, budget, shared_prompt=True), shared_prompt=True),
        },
        "note": "cache pairs/s include Ray Data start-up of the actor pool (model load), as a user pays it",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
