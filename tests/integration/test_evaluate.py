"""`evaluate` end to end: one vLLM engine samples a small demo model and three exports of it,
the report validates against its schema and renders in headless Chromium with no console error.

The exports are built so the right answers are known without the evaluation's own code:
- `ropo-dpo`: RoPO at initialisation (identity rotation, unit magnitude), merged weights equal the
  reference's, so with the same per-request seeds every sample must equal the reference's: KL 0,
  every comparison a tie (win rate 1/2), length ratio 1, HE change 0;
- `ropo-dpo-2`: RoPO with random rotations and magnitudes: a real policy change (KL > 0, recomputed
  here token by token with log_softmax) while the hyperspherical energy of every adapted layer stays
  put (rotations keep every angle between neurons);
- `full-dpo`: full weights with noise added to every q_proj: HE of those layers moves.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from ropo_ray.config import load_config
from ropo_ray.config.load import with_overrides
from ropo_ray.train.demo_model import build_demo_model
from tests.integration.test_demo_model import SMALL

pytestmark = pytest.mark.integration

SETTINGS = ["eval.num_prompts=6", "eval.samples_per_prompt=3", "eval.max_tokens=24", "eval.probe_max_tokens=16",
            "eval.examples=2", "eval.temperature=1.0"]


def _export(model, tokenizer, cfg, folder: Path) -> Path:
    from ropo_ray.runs import export_run

    return export_run(model, tokenizer, cfg, folder, {"step": 0})


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    from ropo_ray.adapters.registry import attach_adapter
    from ropo_ray.data.prepare import prepare
    from ropo_ray.eval.evaluate import evaluate
    from ropo_ray.train.model_io import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    demo = root / "demo"
    build_demo_model(SMALL, demo, log=lambda s: None)
    cfg = load_config(None, [f"pipeline.run_dir={root}/run", *SETTINGS])
    tokenizer = load_tokenizer(demo, cfg.model)
    prepare(cfg, str(demo), root / "data", (str(demo / "task" / "pairs.jsonl"),), log=lambda s: None)

    identity = attach_adapter(load_model(demo, cfg.model), cfg.adapter)
    rotated = copy.deepcopy(identity)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in rotated.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    full_cfg = with_overrides(cfg, ["adapter.type=full"])
    full = attach_adapter(load_model(demo, cfg.model), full_cfg.adapter)
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith("q_proj.weight"):
                p.add_(0.05 * torch.randn_like(p))
    exports = [_export(identity, tokenizer, cfg, root / "identity"), _export(rotated, tokenizer, cfg, root / "rotated"),
               _export(full, tokenizer, full_cfg, root / "full")]
    logs: list[str] = []
    result = evaluate(cfg, demo, demo, exports, root / "data", root / "report", log=logs.append)
    samples = [json.loads(line) for line in (root / "report" / "samples.jsonl").read_text().splitlines()]
    return {"root": root, "demo": demo, "report": result["report"], "paths": result["paths"], "samples": samples,
            "cfg": cfg, "tokenizer": tokenizer, "rotated": root / "rotated" / "merged", "exports": exports,
            "logs": logs}


def _run(report: dict, name: str) -> dict:
    return next(r for r in report["runs"] if r["name"] == name)


def _texts(samples: list[dict], model: str, kind: str = "sample") -> dict[tuple[int, int], str]:
    return {(s["prompt_index"], s["sample_index"]): s["text"] for s in samples if s["model"] == model
            and s["kind"] == kind}


def test_report_validates_against_its_schema(evaluated):
    import jsonschema

    schema = json.loads((Path(__file__).parents[2] / "ropo_ray" / "eval" / "report_schema.json").read_text())
    on_disk = json.loads(Path(evaluated["paths"]["json"]).read_text())
    jsonschema.validate(on_disk, schema)
    assert [r["name"] for r in on_disk["runs"]] == ["ropo-dpo", "ropo-dpo-2", "full-dpo"]
    assert on_disk["settings"]["num_prompts"] == 6 and on_disk["reference"]["metrics"]["samples"] == 18


def test_one_engine_samples_the_reference_and_every_export(evaluated):
    """The exports' merged folders share the reference's engine: one start, a weight reload per export
    (that a reload samples what a fresh engine would: test_sampling_engines.py)."""
    line = next(s for s in evaluated["logs"] if "models sampled" in s)
    assert line == "evaluate: 4 models sampled with 1 engine start(s) and 3 weight reload(s)"


def test_samples_differ_across_prompts_and_within_a_prompt(evaluated):
    ref = _texts(evaluated["samples"], "reference")
    assert len(ref) == 18
    by_prompt = [[ref[(i, j)] for j in range(3)] for i in range(6)]
    assert len({tuple(p) for p in by_prompt}) == 6  # different prompts ask different sums
    assert sum(len(set(p)) > 1 for p in by_prompt) >= 4, by_prompt  # temperature 1: draws differ
    seeds = [s["seed"] for s in evaluated["samples"] if s["model"] == "reference" and s["kind"] == "sample"]
    assert len(set(seeds)) == len(seeds)


def test_identity_export_is_the_reference(evaluated):
    samples, report = evaluated["samples"], evaluated["report"]
    assert _texts(samples, "ropo-dpo") == _texts(samples, "reference")  # same weights, same seeds
    m = _run(report, "ropo-dpo")["metrics"]
    assert abs(m["kl_to_reference"]) < 1e-4 and abs(m["kl_k3"]) < 1e-4
    assert m["ties"] == 1.0 and m["win_rate"] == 0.5 and m["length_ratio"] == 1.0
    assert m["preference_accuracy"] == 0.0  # every implicit-reward margin is exactly 0: never ranked above
    assert all(abs(e["change"]) <= 1e-9 * e["reference"] for e in _run(report, "ropo-dpo")["energy"])


def test_rotation_changes_the_policy_but_not_the_energy(evaluated):
    """KL recomputed here from the samples with per-position log_softmax, independently of the scorer."""
    from ropo_ray.data.tokenize import encode_prompt
    from ropo_ray.eval.evaluate import eval_inputs
    from ropo_ray.train.model_io import load_model

    run = _run(evaluated["report"], "ropo-dpo-2")
    energy = run["energy"]
    assert len(energy) == 2 * 4  # SMALL has 2 layers; RoPO adapts q, k, v, o
    assert all(abs(e["relative_change"]) < 1e-5 for e in energy), energy
    cfg, tok = evaluated["cfg"], evaluated["tokenizer"]
    prompts, _ = eval_inputs(cfg, evaluated["demo"])
    policy, reference = load_model(evaluated["rotated"], cfg.model), load_model(evaluated["demo"], cfg.model)
    diffs = []
    for s in (s for s in evaluated["samples"] if s["model"] == "ropo-dpo-2" and s["kind"] == "sample"):
        prompt = encode_prompt(tok, [{"role": "user", "content": prompts[s["prompt_index"]]["prompt"]}])
        ids = torch.tensor([prompt + s["tokens"]])
        logp = []
        for model in (policy, reference):
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            logp.append(sum(float(lp[len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(s["tokens"])))
        diffs.append(logp[0] - logp[1])
    expected = sum(diffs) / len(diffs)
    assert run["metrics"]["kl_to_reference"] == pytest.approx(expected, abs=1e-3)
    assert run["metrics"]["kl_to_reference"] > 0.01


def test_full_weight_noise_moves_the_energy(evaluated):
    energy = _run(evaluated["report"], "full-dpo")["energy"]
    q = [e for e in energy if e["layer"].endswith("q_proj")]
    others = [e for e in energy if not e["layer"].endswith("q_proj")]
    assert len(q) == 2 and len(energy) == 2 * 7
    assert all(abs(e["relative_change"]) > 1e-4 for e in q)
    assert all(e["change"] == 0.0 for e in others)


def test_knowledge_probe_matches_greedy_hf_generate(evaluated):
    from ropo_ray.data.task import probe_correct
    from ropo_ray.data.tokenize import encode_prompt
    from ropo_ray.eval.evaluate import eval_inputs
    from ropo_ray.train.model_io import load_model

    cfg, tok = evaluated["cfg"], evaluated["tokenizer"]
    _, probes = eval_inputs(cfg, evaluated["demo"])
    model = load_model(evaluated["demo"], cfg.model)
    correct = 0
    for probe in probes:
        ids = encode_prompt(tok, [{"role": "user", "content": probe["prompt"]}])
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        correct += probe_correct(probe, tok.decode(out[0, len(ids):], skip_special_tokens=True))
    reported = evaluated["report"]["reference"]["metrics"]["knowledge_accuracy"]
    assert reported == pytest.approx(correct / len(probes), abs=2 / len(probes) + 1e-9)
    assert math.isfinite(evaluated["report"]["reference"]["metrics"]["knowledge_nll"])


def test_report_html_renders_in_chromium(evaluated, tmp_path):
    from ropo_ray.eval.browser import find_chromium, render_in_browser

    if find_chromium() is None:
        pytest.fail("chromium is not installed: the test setup (scripts/setup.sh) installs it")
    shot = render_in_browser(Path(evaluated["paths"]["html"]), tmp_path / "report.png")
    assert shot["console_errors"] == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_second_evaluation_reuses_the_published_report(evaluated):
    from ropo_ray.eval.evaluate import evaluate, evaluation_fingerprint, published_report

    root, cfg = evaluated["root"], evaluated["cfg"]
    again = evaluate(cfg, evaluated["demo"], evaluated["demo"], evaluated["exports"], root / "data", root / "report",
                     log=lambda s: None)
    assert again.get("reused") is True and again["report"] == json.loads(Path(evaluated["paths"]["json"]).read_text())
    assert published_report(root / "report", "another fingerprint") is None
    more = with_overrides(cfg, ["eval.samples_per_prompt=4"])
    assert evaluation_fingerprint(more, evaluated["demo"], evaluated["exports"]) != \
        evaluation_fingerprint(cfg, evaluated["demo"], evaluated["exports"])


def test_the_scorer_loads_each_policy_once_and_scores_shared_rows_once_under_the_reference(evaluated):
    """The one scoring pass's actor, called in-process on two batches whose rows are grouped by run: the identity
    export's rows score exactly the reference's log-probs, the rotated export's do not, each policy loads once,
    and the reference scores a (prompt, completion) that several runs share once."""
    import numpy as np

    from ropo_ray.eval.scoring import LogpScorer

    cfg, tok, root = evaluated["cfg"], evaluated["tokenizer"], evaluated["root"]
    prompt = tok.encode("what is 2 plus 3?", add_special_tokens=False)
    answers = [tok.encode(t, add_special_tokens=False) for t in ("5", "the answer is 5", "6")]
    scorer = LogpScorer(str(evaluated["demo"]), {"identity": str(root / "identity" / "merged"),
                                                 "rotated": str(evaluated["rotated"])}, cfg.model, micro_batch=2)

    def column(lists: list[list[int]]) -> np.ndarray:  # one object per row, as Ray Data hands ragged lists
        out = np.empty(len(lists), dtype=object)
        out[:] = lists
        return out

    def batch(runs: list[str], picks: list[int]) -> dict:
        return {"run": np.array(runs), "prompt": column([prompt] * len(runs)),
                "completion": column([answers[i] for i in picks])}

    first = scorer(batch(["identity", "identity", "identity", "rotated"], [0, 1, 2, 0]))
    second = scorer(batch(["rotated", "rotated"], [1, 2]))
    assert scorer.policy_loads == 2 and len(scorer.reference_memo) == 3
    assert list(first["policy_logp"][:3]) == list(first["reference_logp"][:3])
    rotated = np.concatenate([first["policy_logp"][3:], second["policy_logp"]])
    shared = np.concatenate([first["reference_logp"][3:], second["reference_logp"]])
    assert list(shared) == list(first["reference_logp"][:3])  # the same rows under the reference, memoised
    assert np.all(np.abs(rotated - shared) > 1e-6)
    assert np.all(np.isfinite(rotated)) and np.all(first["reference_logp"] < 0)
