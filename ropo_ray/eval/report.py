"""report.json and report.html of `ropo-ray evaluate`.

report.json follows report_schema.json (JSON Schema 2020-12, a "description" on every property: that file
is the format's documentation). report.html is one self-contained page for a browser with no network:
inline CSS, figures as inline SVG (plots.py), no script, no link, no image, and every string taken from the
report (prompts and responses are user data) escaped. The headline table lines up the diagnostics of
ROPO_SPEC.md section 4 along the RoPO paper's (arXiv 2508.17637) account of DPO's reward hacking: longer
answers, lower diversity, forgotten knowledge and a rise of hyperspherical energy ("neuron collapse").
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ropo_ray.eval import plots
from ropo_ray.storage import Store, store

SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
EXAMPLES_PER_RUN = 3
MAX_RESPONSE_CHARS = 1500
esc = html.escape


class ReportError(ValueError):
    """The report does not follow report_schema.json; the message starts with the JSON path of the problem."""


@functools.cache
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(report: dict) -> None:
    """Raise ReportError naming the JSON path (e.g. `$.runs[0].metrics.kl_stderr`) of the first problem."""
    errors = list(Draft202012Validator(load_schema()).iter_errors(report))
    if errors:
        first = best_match(errors)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ReportError(f"{first.json_path}: {first.message}{more}")


def _finite(value):
    """NaN and inf become null: JSON has no such numbers, and a NaN loss in a training log is no reason to fail."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _checked(report: dict) -> dict:
    clean = _finite(report)
    validate_report(clean)
    return clean


def write_report(report: dict, folder: str | Path | Store) -> dict[str, Store]:
    """Validate, then write report.json and report.html into `folder` (local or an object-store URI),
    each whole at once; returns where they are."""
    report = _checked(report)
    page = _render(report)  # before writing anything: a failing render leaves the old pair intact
    folder = store(folder)
    paths = {"json": folder.child("report.json"), "html": folder.child("report.html")}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["html"].write_text(page)
    return paths


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page (validated first; raises ReportError)."""
    return _render(_checked(report))


def _render(report: dict) -> str:
    sections = [_header(report), _headline(report), _figures(report), _examples(report), _timing(report["timing"])]
    return PAGE.format(title=esc(f"RoPO evaluation: {report['task']}"), css=CSS, body="\n".join(sections))


def num(value: float | int | None, digits: int = 3) -> str:
    """A metric for a table cell: 3 significant digits, thousands separated, an em dash for null."""
    if value is None:
        return "\u2014"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _header(report: dict) -> str:
    s = report["settings"]
    parts = [f"engine {s['engine']}", f"{s['samples_per_prompt']} samples/prompt", f"temperature {s['temperature']}",
             f"top-p {s['top_p']}", f"max {s['max_tokens']} tokens", f"seed {s['seed']}", f"{s['num_prompts']} prompts",
             f"{s['num_probes']} knowledge probes", f"reward model: {s['reward_model'] or 'none'}",
             f"created {report['created']}"]
    return (f"<h1>RoPO evaluation: {esc(report['task'])}</h1>\n"
            f"<p class=\"settings\">{esc(' · '.join(parts))}</p>")


@dataclass(frozen=True)
class Column:
    label: str
    better: str  # which direction is better, shown under the label
    explain: str
    cell: Callable[[dict], str]  # metrics -> cell text (not yet escaped); a second line goes under it, small


def _win_cell(m: dict) -> str:
    if m["win_rate"] is None:
        return num(None)
    by = {"reward_model": "by RM", "task_reward": "by task reward"}.get(m["win_rate_by"] or "", "")
    return f"{num(m['win_rate'])}\nW {num(m['wins'])} · T {num(m['ties'])} · L {num(m['losses'])} {by}".strip()


def _reward_cell(m: dict) -> str:
    rm = f" (RM {num(m['reward_model_score'])})" if m["reward_model_score"] is not None else ""
    return num(m["task_reward"]) + rm


def _kl_cell(m: dict) -> str:
    stderr = f" ± {num(m['kl_stderr'], 2)}" if m["kl_stderr"] is not None else ""
    return num(m["kl_to_reference"]) + stderr


COLUMNS = [
    Column("task reward", "↑", "Mean verifier reward of the samples (reward-model score in brackets when one is set).",
           _reward_cell),
    Column("win rate vs reference", "↑ (0.5 = parity)",
           "Share of prompts where the policy's sample beats the reference's, ties counted half; W / T / L shares.",
           _win_cell),
    Column("preference accuracy", "↑", "Held-out pairs whose implicit reward ranks the chosen response first.",
           lambda m: num(m["preference_accuracy"])),
    Column("mean length", "ratio to reference ≈ 1",
           "Tokens per response and the ratio to the reference's: DPO reward-hacks by lengthening answers.",
           lambda m: f"{num(m['mean_length'])}\n{num(m['length_ratio'])}× reference"),
    Column("distinct-1", "↑", "Distinct unigrams over all unigrams of the samples: DPO loses diversity.",
           lambda m: num(m["distinct_1"])),
    Column("distinct-2", "↑", "Distinct bigrams over all bigrams of the samples.", lambda m: num(m["distinct_2"])),
    Column("self-BLEU", "↓", "Overlap between the samples of one prompt: higher means less diverse.",
           lambda m: num(m["self_bleu"])),
    Column("KL to reference", "↓ at equal reward",
           "KL(policy ‖ reference) per response on the policy's own samples ± standard error: the drift paid.",
           _kl_cell),
    Column("knowledge accuracy", "↑", "Accuracy on probes the reference knows: a drop is forgotten knowledge.",
           lambda m: num(m["knowledge_accuracy"])),
    Column("knowledge NLL", "↓", "Mean NLL per token of the probes' answers: a rise is forgotten knowledge.",
           lambda m: num(m["knowledge_nll"])),
    Column("mean HE change", "≈ 0",
           "Mean relative change of hyperspherical energy over adapted layers: DPO raises it (neuron collapse), "
           "RoPO's rotations keep it ~0.", lambda m: num(m["energy_change_mean"])),
]


def _name_cell(model: dict) -> str:
    if "adapter" not in model:
        detail = model["model_dir"]
    else:
        params = model["trainable_parameters"]
        detail = f"{model['adapter']} · {model['loss']}"
        if params is not None:
            detail += f" · {num(params)} trainable"
    return f"<th>{esc(model['name'])}<div class=\"detail\">{esc(detail)}</div></th>"


def _cell(text: str) -> str:
    main, _, detail = text.partition("\n")
    return f"<td>{esc(main)}" + (f"<div class=\"detail\">{esc(detail)}</div>" if detail else "") + "</td>"


def _headline(report: dict) -> str:
    head = "".join(f"<th>{esc(c.label)}<div class=\"detail\">{esc(c.better)}</div></th>" for c in COLUMNS)
    rows = []
    for model in (report["reference"], *report["runs"]):
        cells = "".join(_cell(c.cell(model["metrics"])) for c in COLUMNS)
        rows.append(f"<tr>{_name_cell(model)}{cells}</tr>")
    legend = "".join(f"<dt>{esc(c.label)} ({esc(c.better)})</dt><dd>{esc(c.explain)}</dd>" for c in COLUMNS)
    note = "" if report["runs"] else "<p class=\"note\">No trained run in this report: the reference alone.</p>"
    return (f"<h2>Headline</h2>\n{note}<table class=\"headline\"><tr><th>model</th>{head}</tr>\n"
            + "\n".join(rows) + f"</table>\n<dl class=\"legend\">{legend}</dl>")


def _panel(panel: plots.Panel, extra: str = "") -> str:
    body = panel.svg if panel.svg is not None else ""
    note = f"<p class=\"note\">{esc(panel.note)}</p>" if panel.note else ""
    return f"<section class=\"panel\" id=\"panel-{panel.key}\"><h3>{esc(panel.title)}</h3>{note}{body}{extra}</section>"


def _figures(report: dict) -> str:
    ref, runs, sweep = report["reference"], report["runs"], report["sweep"]
    energy = plots.energy_changes(runs)
    sweep_panel = plots.sweep_results(sweep)
    return "\n".join([
        "<h2>Figures</h2>",
        _panel(plots.training_curves(runs)),
        _panel(plots.length_histograms(ref, runs)),
        _panel(plots.reward_vs_kl(ref, runs)),
        _panel(energy, _layer_table(runs) if energy.svg else ""),
        _panel(sweep_panel, _sweep_table(sweep) if sweep is not None else ""),
    ])


def _details(summary: str, header: list[str], rows: list[list[str]], bold: int | None = None) -> str:
    """A collapsible table (no script needed); cells are escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    opening = ["<tr class=\"best\">" if k == bold else "<tr>" for k in range(len(rows))]
    body = "".join(tag + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for tag, row in zip(opening, rows))
    return f"<details><summary>{esc(summary)}</summary><table><tr>{head}</tr>{body}</table></details>"


def _layer_table(runs: list[dict]) -> str:
    changes = {(i, row["layer"]): row["relative_change"] for i, run in enumerate(runs) for row in run["energy"]}
    rows = [[str(k), layer, *(num(changes.get((i, layer))) for i in range(len(runs)))]
            for k, layer in enumerate(plots.layer_order(runs))]
    return _details("Layer names and relative HE change", ["index", "layer", *(run["name"] for run in runs)], rows)


def _sweep_table(sweep: dict) -> str:
    keys = list(dict.fromkeys(key for row in sweep["rows"] for key in row))
    best = plots.best_row(sweep)
    rows = [[num(row.get(k)) if plots.is_number(row.get(k)) else str(row.get(k, "")) for k in keys]
            for row in sweep["rows"]]
    best_params = ", ".join(f"{k} = {v}" for k, v in (sweep["best"] or {}).items()) or "none"
    summary = f"{len(rows)} trials, objective {sweep['objective']!r} ({sweep['mode']}); best: {best_params}"
    return _details(summary, keys, rows, bold=sweep["rows"].index(best) if best is not None else None)


def _response(title: str, example: dict | None) -> str:
    if example is None:
        return f"<div><b>{esc(title)}</b><p class=\"note\">no sample for this prompt</p></div>"
    text = example["response"]
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[:MAX_RESPONSE_CHARS] + " […]"
    reward = f"<span class=\"detail\">reward {num(example['reward'])}</span>"
    return f"<div><b>{esc(title)}</b> {reward}<pre>{esc(text)}</pre></div>"


def _examples(report: dict) -> str:
    """A few samples per run, each next to the reference's sample for the same prompt."""
    reference = {}
    for example in report["reference"]["examples"]:
        reference.setdefault(example["prompt"], example)
    parts = ["<h2>Example responses</h2>"]
    if not report["runs"]:
        parts += [f"<div class=\"example\"><pre class=\"prompt\">{esc(ex['prompt'])}</pre>{_response('reference', ex)}"
                  "</div>" for ex in report["reference"]["examples"][:EXAMPLES_PER_RUN]]
    for run in report["runs"]:
        paired = sorted(run["examples"], key=lambda ex: ex["prompt"] not in reference)[:EXAMPLES_PER_RUN]
        parts.append(f"<h3>{esc(run['name'])}</h3>")
        if not paired:
            parts.append("<p class=\"note\">No examples recorded.</p>")
        parts += [f"<div class=\"example\"><pre class=\"prompt\">{esc(ex['prompt'])}</pre><div class=\"pair\">"
                  f"{_response('reference', reference.get(ex['prompt']))}{_response(run['name'], ex)}</div></div>"
                  for ex in paired]
    return "\n".join(parts)


def _timing(timing: dict) -> str:
    rows = "".join(f"<tr><td>{esc(stage)}</td><td>{seconds:,.1f} s</td></tr>" for stage, seconds in timing.items())
    total = f"<tr class=\"best\"><td>total</td><td>{sum(timing.values()):,.1f} s</td></tr>" if timing else ""
    return f"<h2>Timing</h2>\n<table class=\"timing\"><tr><th>stage</th><th>wall clock</th></tr>{rows}{total}</table>"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1240px;
       padding: 0 16px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; margin-top: 32px; }
.settings, .detail, .note { color: #666; font-size: 0.85em; } .note { font-style: italic; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td:first-child { text-align: left; } tr.best td { font-weight: bold; }
table.headline th .detail { font-weight: normal; }
dl.legend { font-size: 0.85em; display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dl.legend dt { font-weight: bold; } dl.legend dd { margin: 0; }
.panel { margin: 16px 0; } .panel svg { max-width: 100%; height: auto; }
details { margin: 8px 0; } summary { cursor: pointer; color: #444; }
.example { border: 1px solid #ddd; border-radius: 4px; padding: 8px; margin: 8px 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
pre { white-space: pre-wrap; word-break: break-word; background: #fafafa; padding: 6px; margin: 4px 0;
      font-size: 0.85em; } pre.prompt { background: #eef3fa; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
{body}
<p class="detail">report.json schema version 1 (ropo_ray/eval/report_schema.json)</p>
</body>
</html>
"""
