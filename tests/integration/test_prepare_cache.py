"""Ray Data preparation (three schemas, a bad-row corpus, dedup, counts) and the reference cache."""

from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config import load_config
from ropo_ray.data.prepare import prepare
from ropo_ray.data.sources import InputError
from ropo_ray.refcache.stage import WindowCredit, _missing_windows, build_cache, plan_windows, window_rows
from ropo_ray.refcache.store import read_entries, verify
from ropo_ray.train.logprobs import policy_logps
from ropo_ray.train.model_io import load_model, load_tokenizer
from ropo_ray.train.step import evaluate_pairs, make_batch

USER = "What is {i} + 2?"


def good_rows(n, start=0):
    return [{"prompt": USER.format(i=i), "chosen": f"It is {i + 2}.", "rejected": f"It is {i + 3}."}
            for i in range(start, start + n)]


def as_messages(row):
    user = {"role": "user", "content": row["prompt"]}
    return {"chosen": [user, {"role": "assistant", "content": row["chosen"]}],
            "rejected": [user, {"role": "assistant", "content": row["rejected"]}]}


def as_hh(row):
    return {"chosen": f"\n\nHuman: {row['prompt']}\n\nAssistant: {row['chosen']}",
            "rejected": f"\n\nHuman: {row['prompt']}\n\nAssistant: {row['rejected']}"}


BAD_LINES = [  # (kind, raw JSONL line, the reason it must be rejected with)
    ("truncated JSON", b'{"prompt": "What is 1 + 1?", "chosen": "2"', "invalid_json"),
    ("an array, not an object", b'["a list"]', "not_an_object"),
    ("invalid UTF-8", b'{"prompt": "Q\xff", "chosen": "A", "rejected": "B"}', "undecodable_text"),
    ("a missing field", b'{"prompt": "Q", "chosen": "A"}', "missing_field"),
    ("a number as a response", b'{"prompt": "Q", "chosen": 7, "rejected": "B"}', "wrong_type"),
    ("an unknown schema", b'{"chosen": "plain", "rejected": "text"}', "unknown_schema"),
    ("a blank prompt", b'{"prompt": " ", "chosen": "A", "rejected": "B"}', "empty_prompt"),
    ("an empty response", b'{"prompt": "Q", "chosen": "", "rejected": "B"}', "empty_response"),
    ("chosen == rejected", b'{"prompt": "Q", "chosen": "same", "rejected": "same"}', "identical_responses"),
    ("a message without content",
     b'{"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}', "malformed_messages"),
    ("an unknown role",
     b'{"chosen": [{"role": "robot", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]}',
     "unknown_role"),
    ("no assistant turn",
     b'{"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]}',
     "no_assistant_turn"),
    ("HH transcripts with different prompts",
     b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}',
     "prompt_mismatch"),
    ("more tokens than the limits", json.dumps({"prompt": "long " * 400, "chosen": "A", "rejected": "B"}).encode(),
     "too_long"),
    # issue 9: more kinds, each through another code path
    ("a gigantic row: 4 MiB of text, 4x data.max_row_bytes",
     json.dumps({"prompt": "big " * (1 << 20), "chosen": "A", "rejected": "B"}).encode(), "row_too_large"),
    ("a null prompt", b'{"prompt": null, "chosen": "A", "rejected": "B"}', "missing_field"),
    ("a null chosen", b'{"prompt": "Q", "chosen": null, "rejected": "B"}', "missing_field"),
    ("a null rejected", b'{"prompt": "Q", "chosen": "A", "rejected": null}', "missing_field"),
    ("a number as the prompt", b'{"prompt": 42, "chosen": "A", "rejected": "B"}', "wrong_type"),
    ("NaN as a response", b'{"prompt": "Q", "chosen": NaN, "rejected": "B"}', "wrong_type"),
    ("a whitespace-only answer in a message list",
     b'{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
     b'"rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \\t\\n "}]}',
     "empty_response"),
    ("a message list against a string",
     b'{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "rejected": "z"}',
     "malformed_messages"),
    ("a raw control character in a string", b'{"prompt": "Q\x07", "chosen": "A", "rejected": "B"}', "invalid_json"),
    ("an escaped lone surrogate", b'{"prompt": "Q\\ud800", "chosen": "A", "rejected": "B"}', "undecodable_text"),
    ("JSON nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    ("an integer literal of 5,000 digits", b'{"prompt": "Q", "chosen": ' + b"9" * 5000 + b', "rejected": "B"}',
     "invalid_json"),
    ("a key given twice", b'{"prompt": "Q", "chosen": "good", "rejected": "bad", "chosen": "bad!"}',
     "duplicate_key"),
    ("a JSON null line", b"null", "not_an_object"),
]


def odd_good_lines():
    """Rows that look odd but are good, so they must be kept (or be duplicates), never rejected:
    repeated non-string ids on different pairs, a copy of good row 5 under another id, a message-list
    row and an HH row in the JSONL file (mixed schemas in one file), a CRLF line end."""
    a, b = good_rows(2, start=300)
    return [json.dumps({"id": {"n": 1}, **a}).encode(), json.dumps({"id": {"n": 1}, **b}).encode(),
            json.dumps({"id": 99, **good_rows(1, start=5)[0]}).encode(),
            json.dumps(as_messages(good_rows(1, start=310)[0])).encode(),
            json.dumps(as_hh(good_rows(1, start=320)[0])).encode(),
            json.dumps(good_rows(1, start=330)[0]).encode() + b"\r"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """JSONL (schema a + bad lines + odd good lines + one duplicate), Parquet (schema b), a saved HF
    dataset (schema c)."""
    import datasets

    root = tmp_path_factory.mktemp("corpus")
    jsonl = ([json.dumps(r).encode() for r in good_rows(30)] + [raw for _, raw, _ in BAD_LINES] + odd_good_lines()
             + [json.dumps(good_rows(1)[0]).encode()])
    (root / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(jsonl) + b"\n\n")  # BOM, trailing blank line
    pq.write_table(pa.Table.from_pylist([as_messages(r) for r in good_rows(20, start=100)]), root / "b.parquet")
    datasets.Dataset.from_list([as_hh(r) for r in good_rows(10, start=200)]).save_to_disk(str(root / "hh"))
    # the same pair in schema (b) as row 0 of a.jsonl in schema (a): identical tokens, so a duplicate
    (root / "extra").mkdir()
    pq.write_table(pa.Table.from_pylist([as_messages(good_rows(1)[0])]), root / "extra" / "c.parquet")
    counts = {"jsonl": len(jsonl), "parquet": 21, "hh": 10}
    return root, counts


@pytest.fixture(scope="module")
def prepared(ray_local, corpus, tiny_assets, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("run") / "data"
    # 256 KiB per dedup bucket: the 4 MiB of input (most of it the gigantic row) makes 17 buckets, so the
    # duplicates below are found only if every copy of a pair lands in the same bucket
    cfg = load_config(None, ["data.truncation=reject", "data.max_prompt_tokens=200", "data.eval_fraction=0.2",
                             "data.dedup_bucket_bytes=262144"])
    files = (str(root / "a.jsonl"), f"file://{root}/*.parquet", str(root / "hh"), str(root / "extra"))
    manifest = prepare(cfg, str(tiny_assets), out, files=files)
    return cfg, out, manifest, files


def test_counts_add_up_and_every_reason_is_recorded(prepared, corpus):
    _, out, manifest, _ = prepared
    root, counts = corpus
    input_rows = sum(counts.values())  # counted from the fixtures, not by the code under test
    assert len({kind for kind, _, _ in BAD_LINES}) == len(BAD_LINES) == 28
    assert manifest["kept"] + manifest["rejected"] + manifest["duplicates"] == input_rows
    assert manifest["kept"] == 30 + 20 + 10 + 5  # good rows of the three schemas + the 5 odd good lines kept
    assert manifest["duplicates"] == 3  # a.jsonl's last line and the id-99 copy, and extra/c.parquet
    assert manifest["rejected_by_reason"] == dict(sorted(Counter(reason for _, _, reason in BAD_LINES).items()))
    rejects = pads.dataset(str(out / "rejects")).to_table().to_pylist()
    assert len(rejects) == manifest["rejected"] + manifest["duplicates"]
    # every bad line is rejected at its own line (after 30 good ones) with its own reason
    at_line = {r["row_index"]: r for r in rejects if r["source"] == str(root / "a.jsonl")}
    for n, (kind, _, reason) in enumerate(BAD_LINES, start=31):
        assert at_line[n]["reason"] == reason, kind
    assert at_line[31]["raw"] == BAD_LINES[0][1].decode()  # the original row is kept
    assert at_line[33]["raw"] == '{"prompt": "Q\\xff", "chosen": "A", "rejected": "B"}'  # undecodable byte escaped
    giant = at_line[31 + 14]
    assert len(giant["raw"]) == 1024 and giant["raw"].startswith('{"prompt": "big big')
    assert f"row is {len(BAD_LINES[14][1])} bytes" in giant["detail"]
    duplicates = sorted((r["row_index"], r["detail"]) for r in rejects if r["reason"] == "duplicate_pair")
    # the kept copy is the first by (source, row_index): a.jsonl line 1 (after the BOM), line 6 for good row 5
    first, sixth = f"same pair as {root / 'a.jsonl'} row 1", f"same pair as {root / 'a.jsonl'} row 6"
    last = 30 + len(BAD_LINES) + len(odd_good_lines()) + 1
    assert duplicates == [(0, first), (30 + len(BAD_LINES) + 3, sixth), (last, first)]
    input_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert manifest["dedup"]["buckets"] == math.ceil(input_bytes / 262144) > 10


def test_a_dedup_task_holds_one_bucket_whatever_the_input_size(ray_local, tiny_assets, tmp_path):
    """Load: the deduplication's working set does not grow with the input. Four times the pairs make four
    times the buckets (one per data.dedup_bucket_bytes of input), so the largest bucket, the most rows any
    deduplication task reads, stays at the mean (rows / buckets, worked out here) give or take hashing
    noise, and duplicates planted across files are still found."""
    cfg = load_config(None, ["data.dedup_bucket_bytes=32768", "data.eval_fraction=0.2"])
    largest, mean = {}, {}
    for n in (1500, 6000):
        rows = [json.dumps(r).encode() for r in good_rows(n)]
        (tmp_path / f"{n}").mkdir()
        (tmp_path / f"{n}" / "a.jsonl").write_bytes(b"\n".join(rows[: n // 2]) + b"\n")
        # the second file repeats every 10th pair of the first: n // 20 duplicates across files
        (tmp_path / f"{n}" / "b.jsonl").write_bytes(b"\n".join(rows[n // 2:] + rows[: n // 2: 10]) + b"\n")
        input_bytes = sum(p.stat().st_size for p in (tmp_path / f"{n}").iterdir())
        manifest = prepare(cfg, str(tiny_assets), tmp_path / f"out-{n}", files=(str(tmp_path / f"{n}"),))
        assert manifest["kept"] == n and manifest["duplicates"] == n // 20 and manifest["rejected"] == 0
        buckets = math.ceil(input_bytes / 32768)
        assert manifest["dedup"]["buckets"] == buckets
        largest[n], mean[n] = manifest["dedup"]["largest_bucket_rows"], (n + n // 20) / buckets
    assert mean[6000] == pytest.approx(mean[1500], rel=0.15)  # 4x the input, 4x the buckets (give or take a ceil)
    for n in largest:  # a train bucket holds ~80% of its rows; 1.25x the mean bounds the hashing spread
        assert largest[n] <= 1.25 * mean[n], (n, largest[n], mean[n])
    assert largest[6000] <= 1.25 * largest[1500]


def test_wrong_column_types_stop_prepare_before_any_work(corpus, tiny_assets, tmp_path):
    """A Parquet file whose chosen column is int64, among good files: one error naming the file and the
    column, raised before Ray is used or anything is written."""
    root, _ = corpus
    bad = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"prompt": ["Q"], "chosen": [7], "rejected": ["B"]}), bad)
    out = tmp_path / "run" / "data"
    with pytest.raises(InputError, match=f"{bad}: column 'chosen' is int64"):
        prepare(load_config(), str(tiny_assets), out, files=(str(root / "a.jsonl"), str(bad)))
    assert not out.parent.exists()


def test_split_is_deterministic_and_disjoint(prepared):
    _, out, manifest, _ = prepared
    train = set(pads.dataset(str(out / "train")).to_table(columns=["pair_id"])["pair_id"].to_pylist())
    evals = set(pads.dataset(str(out / "eval")).to_table(columns=["pair_id"])["pair_id"].to_pylist())
    assert not train & evals and len(train) == manifest["train"] and len(evals) == manifest["eval"]
    assert 0 < manifest["eval"] < manifest["kept"]


def test_rerun_is_a_no_op_and_a_setting_change_rebuilds(prepared, tiny_assets):
    cfg, out, manifest, files = prepared
    created = manifest["created"]
    assert prepare(cfg, str(tiny_assets), out, files=files)["created"] == created
    changed = load_config(None, ["data.truncation=reject", "data.max_prompt_tokens=201", "data.eval_fraction=0.2"])
    rebuilt = prepare(changed, str(tiny_assets), out.with_name("data2"), files=files)
    assert rebuilt["fingerprint"] != manifest["fingerprint"]


def test_cache_hit_performs_no_forward_and_grows_incrementally(prepared, tiny_assets, tmp_path):
    cfg, out, manifest, _ = prepared
    cfg = load_config(None, [f"cache.root={tmp_path}/cache", "cache.token_budget=400", "data.truncation=reject",
                             "data.max_prompt_tokens=200", "data.eval_fraction=0.2"])
    first = build_cache(cfg, tiny_assets, tiny_assets, out)
    assert first["computed"] == manifest["kept"] and first["reference_forwards"] > 0
    second = build_cache(cfg, tiny_assets, tiny_assets, out)
    assert second["reference_forwards"] == 0 and second["computed"] == 0
    # beta and lr are not in the key: the same cache serves them with no forward
    tuned = load_config(None, [f"cache.root={tmp_path}/cache", "loss.beta=0.5", "train.lr=0.3",
                               "data.truncation=reject", "data.max_prompt_tokens=200", "data.eval_fraction=0.2"])
    assert build_cache(tuned, tiny_assets, tiny_assets, out)["reference_forwards"] == 0


def test_altered_cache_is_detected_and_rebuilt(prepared, tiny_assets, tmp_path):
    _, out, manifest, _ = prepared
    cfg = load_config(None, [f"cache.root={tmp_path}/cache", "data.truncation=reject", "data.max_prompt_tokens=200",
                             "data.eval_fraction=0.2"])
    first = build_cache(cfg, tiny_assets, tiny_assets, out)
    part = next(iter(sorted((tmp_path / "cache" / first["key"]).glob("*.parquet"))))
    table = pq.read_table(part)
    pq.write_table(table.set_column(1, "ref_chosen_logps", pa.array([0.0] * table.num_rows, pa.float32())), part)
    with pytest.raises(ValueError, match="checksum differs"):
        verify(part.parent)
    again = build_cache(cfg, tiny_assets, tiny_assets, out)
    assert again["computed"] == manifest["kept"] and again["reference_forwards"] > 0
    verify(part.parent)


def test_the_cache_stage_streams_sorted_windows_without_the_cached_pairs(prepared, ray_local):
    """Load: the cache stage holds one window of pairs at a time. The windows cover every prepared row once,
    each at most 7 rows here (cache.sort_window_rows), spanning files (17 dedup buckets make small ones);
    each window is sorted by width (prompt + the longer response, worked out here from the token lists) and
    leaves out exactly the pairs the cache already holds."""
    _, out, manifest, _ = prepared
    train = pads.dataset(str(out / "train")).to_table().to_pylist()
    known = [r["pair_id"] for r in train[::3]]
    files = [(str(p), pq.ParquetFile(p).metadata.num_rows) for p in sorted((out / "train").glob("*.parquet"))]
    assert len(files) > 3 and sum(n for _, n in files) == manifest["train"]
    plan = plan_windows(files, 7)
    assert [sum(s["rows"] for s in w) for w in plan] == [7] * (manifest["train"] // 7) + (
        [manifest["train"] % 7] if manifest["train"] % 7 else [])
    assert any(len(w) > 1 for w in plan)  # a window spanning files
    credit = WindowCredit.remote(10**6)
    windows = [w.to_pylist() for w in _missing_windows(
        {"slices": plan}, pafs.LocalFileSystem(), ray_local.put(pa.array(known, pa.string())), credit)]
    # every planned row passed through the credit; the cached ones were handed back as soon as they were dropped
    totals = ray_local.get(credit.totals.remote())
    assert totals["granted"] == manifest["train"] and totals["released"] == len(known)
    assert len(windows) == len(plan) and all(len(w) <= 7 for w in windows)
    for w in windows:
        widths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in w]
        assert widths == sorted(widths)
    got = [r["pair_id"] for w in windows for r in w]
    assert sorted(got) == sorted(set(r["pair_id"] for r in train) - set(known)) and len(got) == len(set(got))


def test_the_cache_stage_reads_no_further_ahead_than_its_credit(prepared, tiny_assets, tmp_path):
    """Load: the zero-CPU window reader waits for the pool. Windows of 4 pairs, batches of 2, one actor and one
    window of read-ahead: at most (1 + 1) x 4 + 2 = 10 of the 65 pairs are ever between read and written.
    Without the wait, every window is read while the actor is still loading its model (the peak was the
    whole 65 when `acquire` granted at once)."""
    _, out, manifest, _ = prepared
    cfg = load_config(None, ["data.truncation=reject", "data.max_prompt_tokens=200", "data.eval_fraction=0.2",
                             f"cache.root={tmp_path}/cache", "cache.sort_window_rows=4", "cache.batch_rows=2",
                             "cache.read_ahead_windows=1"])
    summary = build_cache(cfg, tiny_assets, tiny_assets, out)
    flow = summary["in_flight"]
    assert summary["computed"] == manifest["kept"] == 65 and summary["cache_rows"] == 65
    assert flow["bound"] == 10 and flow["granted"] == flow["released"] == 65
    assert 4 <= flow["peak"] <= 10


def test_small_data_still_gives_every_actor_windows():
    """A window reaches the pool as one block, and a block goes to one actor: the window shrinks so there
    are at least two per actor, never below cache.batch_rows, never above cache.sort_window_rows."""
    cfg = load_config(None, ["cache.num_actors=4", "cache.batch_rows=16", "cache.sort_window_rows=1000"])
    assert window_rows(800, cfg) == 100 and len(plan_windows([("a", 500), ("b", 300)], 100)) == 8
    assert window_rows(50, cfg) == 16 and window_rows(100_000, cfg) == 1000


def test_a_cache_pool_holding_every_cpu_scores_what_one_actor_does(prepared, tiny_assets, tmp_path):
    """Two actors on the session's two CPUs: reading and sorting the windows needs no CPU of its own, so the
    stage cannot wait for one forever (a read task with a CPU did, before), and the pool's log-probs are the
    one-actor pool's."""
    _, out, manifest, _ = prepared
    base = ["data.truncation=reject", "data.max_prompt_tokens=200", "data.eval_fraction=0.2",
            "cache.sort_window_rows=16", "cache.batch_rows=4"]
    one = build_cache(load_config(None, [*base, f"cache.root={tmp_path}/one"]), tiny_assets, tiny_assets, out)
    two = build_cache(load_config(None, [*base, f"cache.root={tmp_path}/two", "cache.num_actors=2"]),
                      tiny_assets, tiny_assets, out)
    assert one["computed"] == two["computed"] == manifest["kept"]
    a, b = ({r["pair_id"]: r for r in read_entries(x["cache_dir"]).to_pylist()} for x in (one, two))
    assert a.keys() == b.keys() and len(a) == manifest["kept"]
    for k in a:
        assert abs(a[k]["ref_chosen_logps"] - b[k]["ref_chosen_logps"]) <= 1e-4
        assert abs(a[k]["ref_rejected_logps"] - b[k]["ref_rejected_logps"]) <= 1e-4


def test_step0_policy_matches_cache_and_dpo_loss_is_ln2(prepared, tiny_assets, tmp_path):
    """The training code path (RoPO at init) reproduces the cached log-probs in either of its layouts:
    template, truncation, padding and dtype agree between cache (built in the default shared-prompt layout)
    and training."""
    cfg, out, _, _ = prepared
    cfg = load_config(None, [f"cache.root={tmp_path}/cache", "data.truncation=reject", "data.max_prompt_tokens=200",
                             "data.eval_fraction=0.2"])
    summary = build_cache(cfg, tiny_assets, tiny_assets, out)
    cache = {r["pair_id"]: r for r in read_entries(summary["cache_dir"]).to_pylist()}
    rows = pads.dataset(str(out / "train")).to_table().to_pylist()
    joined = [{**r, **cache[r["pair_id"]]} for r in rows]
    model = attach_adapter(load_model(tiny_assets, cfg.model), cfg.adapter)
    pad_id = load_tokenizer(tiny_assets, cfg.model).pad_token_id
    assert cfg.train.shared_prompt  # the cache's layout
    for shared in (False, True):
        with torch.no_grad():
            out_logps = policy_logps(model, make_batch(joined[:16], pad_id, shared_prompt=shared))
        for i, row in enumerate(joined[:16]):
            assert abs(out_logps["chosen_logps"][i].item() - row["ref_chosen_logps"]) <= 1e-5, (shared, i)
            assert abs(out_logps["rejected_logps"][i].item() - row["ref_rejected_logps"]) <= 1e-5, (shared, i)
        metrics = evaluate_pairs(model, joined, pad_id, cfg.loss, shared_prompt=shared)
        assert abs(metrics["eval/loss"] - math.log(2)) <= 1e-5


def test_the_block_cap_holds_inside_its_stage_only(ray_local):
    """prepare and the cache stage cap Ray Data's blocks while they run; the cap never leaks out, even when the
    stage fails."""
    from ropo_ray.data.blocks import max_block_bytes

    context = ray_local.data.DataContext.get_current()
    before = context.target_max_block_size
    with pytest.raises(RuntimeError, match="stage failed"), max_block_bytes(1 << 20):
        assert ray_local.data.DataContext.get_current().target_max_block_size == 1 << 20 != before
        raise RuntimeError("stage failed")
    assert context.target_max_block_size == before
