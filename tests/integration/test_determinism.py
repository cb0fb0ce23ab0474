"""Same seed and settings, same run: the loss curve repeats bit for bit, on one worker and on two.

What makes it so: the training rows reach the workers in one order whatever the cluster's timing
(`joined_dataset` sorts the joined rows by pair_id and splits them into blocks sized from the row count, and
Ray Data's split between workers is a function of that block sequence), the local shuffle is seeded
per epoch, every worker runs with the same thread count, and gloo's all-reduce of two ranks is
exact. Before the join was ordered, two identical runs differed by about 2% in held-out loss after
8 steps (between two `ropo-ray train` processes; within one Ray session the join often happens to
come out the same, so the curve test alone cannot catch a lost ordering: the first test pins it).
A different seed must give a different curve, so the comparison can fail.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ropo_ray.train.ray_trainer import joined_dataset
from tests.integration.test_ray_train import history, run

pytestmark = pytest.mark.integration

SETTINGS = ["train.micro_batch_size=8", "train.max_steps=6", "train.checkpoint_every=100", "train.eval_every=3"]


def test_row_order_does_not_depend_on_how_the_join_ran(polite_data, tmp_path):
    """The fixture's training pairs in three files, in a shuffled order (prepare writes one sorted file
    per dedup bucket, so several files are not in pair_id order), read as 1 or as 5 blocks (joined in
    different batches): the training rows come out sorted by pair_id, in the same blocks."""
    root, _, cache_dir = polite_data
    table = pq.read_table(Path(root) / "data" / "train")
    order = list(range(table.num_rows))
    random.Random(0).shuffle(order)
    (tmp_path / "data" / "train").mkdir(parents=True)
    for i in range(3):
        pq.write_table(table.take(order[i::3]), tmp_path / "data" / "train" / f"part-{i}.parquet")
    layouts = []
    for read_blocks in (1, 5):
        ds, rows = joined_dataset(tmp_path / "data", cache_dir, "train", read_blocks)
        blocks = [b.column("pair_id").to_pylist() for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
        assert sum(len(b) for b in blocks) == rows == 164
        layouts.append(blocks)
    assert layouts[0] == layouts[1]
    flat = [pid for block in layouts[0] for pid in block]
    assert flat == sorted(table.column("pair_id").to_pylist())


def test_a_pair_missing_from_the_cache_stops_the_join(polite_data, tmp_path):
    """One more training pair than the cache holds: an error counting it, never a silently smaller
    training set."""
    root, _, cache_dir = polite_data
    table = pq.read_table(Path(root) / "data" / "train")
    extra = table.slice(0, 1).set_column(table.schema.get_field_index("pair_id"), "pair_id", pa.array(["f" * 32]))
    (tmp_path / "data" / "train").mkdir(parents=True)
    pq.write_table(pa.concat_tables([table, extra]), tmp_path / "data" / "train" / "part-0.parquet")
    with pytest.raises(ValueError, match="1 of 165 train pairs have no cached reference log-probs"):
        joined_dataset(tmp_path / "data", cache_dir, "train")


def curve(polite_data, tiny_assets, tmp_path, name, overrides):
    run(polite_data, tiny_assets, tmp_path, [*SETTINGS, *overrides], name=name)
    records = history(tmp_path, name)
    return [(r["step"], r.get("loss"), r.get("eval/loss")) for r in records]


@pytest.mark.parametrize("workers", [1, 2])
def test_same_seed_same_loss_curve(polite_data, tiny_assets, tmp_path, workers):
    overrides = [f"train.num_workers={workers}"]
    first = curve(polite_data, tiny_assets, tmp_path, "first", overrides)
    second = curve(polite_data, tiny_assets, tmp_path, "second", overrides)
    assert [s for s, _, _ in first] == [0, 1, 2, 3, 4, 5, 6]
    assert first == second  # exact: every step's loss and every held-out loss
    if workers == 1:
        other = curve(polite_data, tiny_assets, tmp_path, "other-seed", [*overrides, "train.seed=1"])
        assert [loss for _, loss, _ in other] != [loss for _, loss, _ in first]
