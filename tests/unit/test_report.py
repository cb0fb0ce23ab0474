"""The evaluation report: schema validation, the self-contained HTML, and a headless-Chromium check.

The browser tests skip only when no Chromium is on PATH and ROPO_REQUIRE_CHROMIUM is unset; with it set,
a missing Chromium fails. The console-error check is shown able to fail on a deliberately broken page.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from ropo_ray.eval.browser import console_errors, find_chromium, render_in_browser
from ropo_ray.eval.report import ReportError, load_schema, render_html, validate_report, write_report

LAYERS = [f"model.layers.{i}.self_attn.{proj}" for i in (0, 1) for proj in ("q_proj", "v_proj")]
HOSTILE = '<script>alert("pwned")</script> & <img src=x onerror=alert(1)>'


def _metrics(rng: random.Random, reference: bool, length: float) -> dict:
    compare = (lambda v: None) if reference else (lambda v: v)
    win = rng.uniform(0.4, 0.7)
    return {
        "task_reward": rng.uniform(0.3, 0.9), "reward_model_score": None, "win_rate": compare(win),
        "win_rate_by": compare("task_reward"), "wins": compare(win - 0.05), "ties": compare(0.1),
        "losses": compare(0.95 - win), "mean_length": length, "length_ratio": length / 40.0,
        "stopped_fraction": rng.uniform(0.8, 1.0), "distinct_1": rng.uniform(0.2, 0.5),
        "distinct_2": rng.uniform(0.4, 0.8), "self_bleu": rng.uniform(0.1, 0.6),
        "kl_to_reference": compare(rng.uniform(0.5, 5.0)), "kl_k3": compare(rng.uniform(0.5, 5.0)),
        "kl_stderr": compare(0.2), "preference_accuracy": compare(rng.uniform(0.6, 0.9)),
        "knowledge_accuracy": rng.uniform(0.7, 0.9), "knowledge_nll": rng.uniform(0.5, 1.5),
        "energy_change_mean": compare(rng.uniform(-1e-6, 1e-3)), "samples": 64,
    }


def _examples(rng: random.Random, who: str) -> list[dict]:
    return [{"prompt": f"What is {a} + {a + 1}?", "response": f"{who}: the answer is {2 * a + 1}.",
             "reward": float(rng.random() > 0.3)} for a in range(4)]


def _training(rng: random.Random, steps: int = 20) -> list[dict]:
    rows = []
    for step in range(steps + 1):
        if step % 5 == 0:
            rows.append({"step": step, "eval/loss": 0.69 * math.exp(-step / 15), "checkpoint": None,
                         "eval/rewards/accuracies": min(1.0, 0.5 + step / 40 + rng.uniform(0, 0.05))})
        if step:
            rows.append({"step": step, "loss": 0.69 * math.exp(-step / 10) + rng.uniform(0, 0.05), "lr": 1e-3,
                         "rewards/margins": step / 10})
    return rows


def _run(rng: random.Random, name: str, adapter: str, loss: str, length: float, growth: float) -> dict:
    energy = [{"layer": layer, "reference": 1000.0, "policy": 1000.0 * (1 + growth * k), "change": 1000.0 * growth * k,
               "relative_change": growth * k} for k, layer in enumerate(LAYERS, start=1)]
    return {"name": name, "adapter": adapter, "loss": loss, "model_dir": f"runs/{name}/merged",
            "trainable_parameters": 12_288 if adapter == "ropo" else None,
            "metrics": _metrics(rng, reference=False, length=length),
            "lengths": [max(1, int(rng.gauss(length, 8))) for _ in range(64)], "examples": _examples(rng, name),
            "energy": energy, "training": _training(rng)}


def make_report(seed: int = 0) -> dict:
    """A realistic report: reference + a RoPO run and a DPO run, training logs, 4 layers, a 4-trial sweep."""
    rng = random.Random(seed)
    sweep_rows = [{"trial": f"t-{k:04d}", "status": "TERMINATED", "train.lr": lr, "loss.beta": beta,
                   "objective": 0.3 + abs(math.log10(lr) + 3) / 10 + beta / 5}
                  for k, (lr, beta) in enumerate([(1e-4, 0.1), (1e-3, 0.1), (1e-3, 0.5), (1e-2, 0.3)])]
    return {
        "schema_version": 1, "created": "2025-11-24T21:00:00+00:00", "task": "built-in arithmetic",
        "settings": {"engine": "vllm", "samples_per_prompt": 4, "temperature": 0.8, "top_p": 0.95, "max_tokens": 128,
                     "seed": 0, "num_prompts": 16, "num_probes": 8, "reward_model": None},
        "reference": {"name": "reference", "model_dir": "models/sft", "metrics": _metrics(rng, True, 40.0),
                      "lengths": [max(1, int(rng.gauss(40, 8))) for _ in range(64)],
                      "examples": _examples(rng, "reference")},
        "runs": [_run(rng, "ropo-ropo", "ropo", "ropo", 42.0, 1e-7), _run(rng, "full-dpo", "full", "dpo", 70.0, 2e-3)],
        "sweep": {"objective": "objective", "mode": "min", "rows": sweep_rows,
                  "best": {"train.lr": 1e-3, "loss.beta": 0.1}},
        "timing": {"sample reference": 12.5, "sample ropo-ropo": 11.0, "score": 30.25},
    }


def minimal_report() -> dict:
    """One run, no training log, no sweep, null KL."""
    report = make_report()
    report["runs"] = report["runs"][:1]
    run = report["runs"][0]
    run["training"] = []
    run["metrics"] |= {"kl_to_reference": None, "kl_k3": None, "kl_stderr": None}
    report["sweep"] = None
    return report


def panels(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section class="panel" id="panel-(\w+)">(.*?)</section>', page, flags=re.S))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """make_report() written once (rendering takes about a second) for the HTML and browser tests."""
    return write_report(make_report(), tmp_path_factory.mktemp("report") / "eval")


@pytest.fixture(scope="module")
def page(written) -> str:
    return written["html"].read_text()


# --- schema ---------------------------------------------------------------------------------------------------

def test_built_report_validates():
    validate_report(make_report())
    validate_report(minimal_report())
    validate_report(make_report() | {"runs": []})


def test_missing_required_key_names_its_path():
    report = make_report()
    del report["settings"]["seed"]
    with pytest.raises(ReportError, match=r"^\$\.settings: 'seed' is a required property"):
        validate_report(report)
    report = make_report()
    del report["runs"][1]["metrics"]["self_bleu"]
    with pytest.raises(ReportError, match=r"^\$\.runs\[1\]\.metrics: 'self_bleu' is a required property"):
        validate_report(report)


def test_string_for_a_number_names_its_path():
    report = make_report()
    report["runs"][1]["metrics"]["kl_stderr"] = "0.2"
    with pytest.raises(ReportError, match=r"^\$\.runs\[1\]\.metrics\.kl_stderr: '0.2' is not of type"):
        validate_report(report)
    report = make_report()
    report["runs"][0]["energy"][2]["relative_change"] = "big"
    with pytest.raises(ReportError, match=r"^\$\.runs\[0\]\.energy\[2\]\.relative_change"):
        validate_report(report)


def test_every_schema_property_is_documented():
    undocumented = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                if "description" not in sub:
                    undocumented.append(f"{path}.{name}")
            for key, sub in node.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(node, list):
            for k, sub in enumerate(node):
                walk(sub, f"{path}[{k}]")

    Draft202012Validator.check_schema(load_schema())
    walk(load_schema(), "$")
    assert undocumented == []


def test_non_finite_numbers_become_null(tmp_path):
    report = minimal_report()
    report["runs"][0]["training"] = _training(random.Random(0))
    report["runs"][0]["training"][1]["loss"] = float("nan")
    written = json.loads(write_report(report, tmp_path)["json"].read_text())
    assert written["runs"][0]["training"][1]["loss"] is None
    report["runs"][0]["metrics"]["mean_length"] = float("inf")  # not nullable: refused, with its path
    with pytest.raises(ReportError, match=r"\$\.runs\[0\]\.metrics\.mean_length"):
        write_report(report, tmp_path)


def test_write_report_writes_both_files_atomically(written):
    assert set(written) == {"json", "html"}
    assert json.loads(written["json"].read_text()) == make_report()
    assert written["html"].read_text().startswith("<!DOCTYPE html>")
    assert [f.name for f in written["html"].parent().files()] == ["report.html", "report.json"]  # no temp left


# --- HTML -----------------------------------------------------------------------------------------------------

def test_page_is_self_contained(page):
    assert "<script" not in page.lower() and "<link" not in page.lower() and "<img" not in page.lower()
    assert "@import" not in page and "url(http" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls and all(url.startswith("http://www.w3.org/") for url in urls), urls  # SVG namespaces only


def test_svg_ids_do_not_clash_across_figures(page):
    """Five inline SVGs share one document: their ids must be unique and every reference must resolve."""
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert set(re.findall(r'(?:href="#|url\(#)([^")]+)', page)) <= set(ids)


def test_page_names_every_model_and_column(page):
    for name in ("reference", "ropo-ropo", "full-dpo"):
        assert name in page
    columns = ("task reward", "win rate vs reference", "preference accuracy", "mean length", "distinct-1",
               "distinct-2", "self-BLEU", "KL to reference", "knowledge accuracy", "knowledge NLL", "mean HE change")
    for label in columns:
        assert f"<th>{label}<div" in page
    headline = re.search(r'<table class="headline">(.*?)</table>', page, flags=re.S).group(1)
    assert headline.count("<tr>") == 1 + 3  # header row + reference + 2 runs


def test_one_svg_per_plot(page):
    found = panels(page)
    assert set(found) == {"training", "lengths", "reward_kl", "energy", "sweep"}
    assert all(body.count("<svg") == 1 for body in found.values())
    assert page.count("<svg") == 5
    assert all(layer in found["energy"] for layer in LAYERS)  # the index -> layer-name table
    assert "t-0001" in found["sweep"]  # sweep table, best trial (lr 1e-3, beta 0.1) in bold
    assert '<tr class="best"><td>t-0001</td>' in found["sweep"]


def test_user_text_is_escaped():
    report = minimal_report()
    report["task"] = HOSTILE
    report["runs"][0]["name"] = "ropo</th><script>x()</script>"
    report["runs"][0]["examples"][0]["response"] = HOSTILE
    report["reference"]["examples"][0]["prompt"] = report["runs"][0]["examples"][0]["prompt"] = HOSTILE
    report["runs"][0]["energy"][0]["layer"] = HOSTILE
    report["timing"][HOSTILE] = 1.0
    page = render_html(report)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "ropo&lt;/th&gt;&lt;script&gt;x()&lt;/script&gt;" in page


def test_missing_data_omits_panels_with_a_note():
    found = panels(render_html(minimal_report()))
    assert found["lengths"].count("<svg") == 1 and found["energy"].count("<svg") == 1
    for key, why in (("training", "no run has a training log"), ("reward_kl", "no run has both a KL"),
                     ("sweep", "no sweep")):
        assert "<svg" not in found[key] and why in found[key], key


def test_sparse_data_never_crashes_the_page():
    """Every nullable metric null, odd training rows, a run without energy or lengths, a sweep that failed."""
    report = make_report()
    not_nullable = {"mean_length", "length_ratio", "stopped_fraction", "distinct_1", "distinct_2", "self_bleu",
                    "samples"}
    for model in (report["reference"], *report["runs"]):
        model["metrics"] |= {key: None for key in model["metrics"] if key not in not_nullable}
    report["runs"][0]["training"] = [{"step": 3, "lr": 1e-3}, {"step": 4, "eval/loss": None, "checkpoint": "ckpt/4"}]
    report["runs"][1] |= {"energy": [], "lengths": [], "examples": []}
    report["sweep"]["rows"] = [{"trial": "t-0", "status": "ERROR", "objective": None}]
    report["sweep"]["best"] = None
    found = panels(render_html(report))
    assert "no task reward or reward-model score" in found["reward_kl"]
    assert "no trial reported the objective" in found["sweep"]
    assert "Not shown (no energy recorded): full-dpo" in found["energy"]
    assert found["training"].count("<svg") == 1 and found["lengths"].count("<svg") == 1


def test_reference_only_report_renders():
    page = render_html(make_report() | {"runs": [], "sweep": None})
    assert "the reference alone" in page and "no trained run to compare" in page
    assert page.count("<svg") == 0


# --- headless Chromium ----------------------------------------------------------------------------------------

@pytest.fixture
def chromium() -> str:
    """Chromium's path; skip without one, unless ROPO_REQUIRE_CHROMIUM is set (then its absence fails)."""
    path = find_chromium()
    if path is None:
        if os.environ.get("ROPO_REQUIRE_CHROMIUM"):
            pytest.fail("ROPO_REQUIRE_CHROMIUM is set but none of chromium, chromium-browser, google-chrome is on PATH")
        pytest.skip("no Chromium on PATH (set ROPO_REQUIRE_CHROMIUM=1 to fail instead)")
    return path


def test_console_errors_from_devtools_events():
    """The event parsing alone, on recorded event shapes (no browser)."""
    events = [
        {"method": "Runtime.consoleAPICalled", "params": {"type": "log", "args": [{"type": "string", "value": "ok"}]}},
        {"method": "Runtime.consoleAPICalled", "params": {"type": "error", "args": [{"type": "string", "value": "bad"},
                                                                                    {"type": "number", "value": 2}]}},
        {"method": "Runtime.exceptionThrown", "params": {"exceptionDetails": {
            "text": "Uncaught", "exception": {"description": "Error: boom\n    at file:///x.html:3:15"}}}},
        {"method": "Log.entryAdded", "params": {"entry": {"source": "network", "level": "error",
                                                          "text": "Failed to load resource", "url": "file:///m.png"}}},
        {"method": "Log.entryAdded", "params": {"entry": {"source": "other", "level": "warning", "text": "meh"}}},
    ]
    assert console_errors(events) == ["console.error: bad 2", "Uncaught Error: boom",
                                      "network: Failed to load resource file:///m.png"]


def test_report_renders_in_chromium_without_errors(chromium, written, tmp_path):
    result = render_in_browser(Path(written["html"].path), tmp_path / "report.png")
    assert result["console_errors"] == []
    png = result["screenshot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and result["bytes"] == len(png) > 10_000


def test_broken_page_errors_are_reported(chromium, tmp_path):
    """Proof the check can fail: a console.error, an uncaught exception and a missing image are all seen."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><p>broken</p><script>console.log("fine"); console.error("bad")'
                      '</script><script>throw new Error("boom")</script><img src="missing.png"></body></html>')
    errors = render_in_browser(broken, tmp_path / "broken.png")["console_errors"]
    assert "console.error: bad" in errors
    assert "Uncaught Error: boom" in errors
    assert any("ERR_FILE_NOT_FOUND" in e and "missing.png" in e for e in errors), errors
    assert len(errors) == 3 and not any("fine" in e for e in errors)
