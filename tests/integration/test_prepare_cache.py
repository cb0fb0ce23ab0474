"""Ray Data preparation (three schemas, a bad-row corpus, dedup, counts) and the reference cache."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config import load_config
from ropo_ray.data.prepare import prepare
from ropo_ray.refcache.stage import build_cache
from ropo_ray.refcache.store import read_entries, verify
from ropo_ray.train.logprobs import concatenated_forward
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


BAD_LINES = {  # raw JSONL line -> the reason it must be rejected with
    b'{"prompt": "What is 1 + 1?", "chosen": "2"': "invalid_json",
    b'["a list"]': "not_an_object",
    b'{"prompt": "Q\xff", "chosen": "A", "rejected": "B"}': "undecodable_text",
    b'{"prompt": "Q", "chosen": "A"}': "missing_field",
    b'{"prompt": "Q", "chosen": 7, "rejected": "B"}': "wrong_type",
    b'{"chosen": "plain", "rejected": "text"}': "unknown_schema",
    b'{"prompt": " ", "chosen": "A", "rejected": "B"}': "empty_prompt",
    b'{"prompt": "Q", "chosen": "", "rejected": "B"}': "empty_response",
    b'{"prompt": "Q", "chosen": "same", "rejected": "same"}': "identical_responses",
    b'{"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}': "malformed_messages",
    b'{"chosen": [{"role": "robot", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]}':
        "unknown_role",
    b'{"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]}':
        "no_assistant_turn",
    b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}':
        "prompt_mismatch",
    json.dumps({"prompt": "long " * 400, "chosen": "A", "rejected": "B"}).encode(): "too_long",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """JSONL (schema a + bad lines + one duplicate), Parquet (schema b), a saved HF dataset (schema c)."""
    import datasets

    root = tmp_path_factory.mktemp("corpus")
    jsonl = [json.dumps(r).encode() for r in good_rows(30)] + list(BAD_LINES) + [json.dumps(good_rows(1)[0]).encode()]
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
    cfg = load_config(None, ["data.truncation=reject", "data.max_prompt_tokens=200", "data.eval_fraction=0.2"])
    files = (str(root / "a.jsonl"), f"file://{root}/*.parquet", str(root / "hh"), str(root / "extra"))
    manifest = prepare(cfg, str(tiny_assets), out, files=files)
    return cfg, out, manifest, files


def test_counts_add_up_and_every_reason_is_recorded(prepared, corpus):
    _, out, manifest, _ = prepared
    _, counts = corpus
    input_rows = sum(counts.values())  # counted from the fixtures, not by the code under test
    assert manifest["kept"] + manifest["rejected"] + manifest["duplicates"] == input_rows
    assert manifest["kept"] == 30 + 20 + 10
    assert manifest["duplicates"] == 2  # a.jsonl's last line, and extra/c.parquet
    assert manifest["rejected_by_reason"] == {reason: 1 for reason in BAD_LINES.values()}
    rejects = pads.dataset(str(out / "rejects")).to_table().to_pylist()
    assert len(rejects) == manifest["rejected"] + manifest["duplicates"]
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["invalid_json"]["raw"].startswith('{"prompt": "What is 1 + 1?"')  # the original row is kept
    assert by_reason["undecodable_text"]["raw"].endswith('"rejected": "B"}')
    duplicates = [r for r in rejects if r["reason"] == "duplicate_pair"]
    # the kept copy is the first by (source, row_index): a.jsonl line 1 (after the BOM)
    assert {r["detail"] for r in duplicates} == {f"same pair as {corpus[0] / 'a.jsonl'} row 1"}


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


def test_step0_policy_matches_cache_and_dpo_loss_is_ln2(prepared, tiny_assets, tmp_path):
    """The training code path (RoPO at init) reproduces the cached log-probs: template, truncation,
    padding and dtype agree between cache and training."""
    cfg, out, _, _ = prepared
    cfg = load_config(None, [f"cache.root={tmp_path}/cache", "data.truncation=reject", "data.max_prompt_tokens=200",
                             "data.eval_fraction=0.2"])
    summary = build_cache(cfg, tiny_assets, tiny_assets, out)
    cache = {r["pair_id"]: r for r in read_entries(summary["cache_dir"]).to_pylist()}
    rows = pads.dataset(str(out / "train")).to_table().to_pylist()
    joined = [{**r, **cache[r["pair_id"]]} for r in rows]
    model = attach_adapter(load_model(tiny_assets, cfg.model), cfg.adapter)
    pad_id = load_tokenizer(tiny_assets, cfg.model).pad_token_id
    with torch.no_grad():
        out_logps = concatenated_forward(model, make_batch(joined[:16], pad_id))
    for i, row in enumerate(joined[:16]):
        assert abs(out_logps["chosen_logps"][i].item() - row["ref_chosen_logps"]) <= 1e-5
        assert abs(out_logps["rejected_logps"][i].item() - row["ref_rejected_logps"]) <= 1e-5
    metrics = evaluate_pairs(model, joined, pad_id, cfg.loss)
    assert abs(metrics["eval/loss"] - math.log(2)) <= 1e-5
