"""`ropo-ray evaluate`: sample trained policies and their reference with vLLM, score, report.

For the reference and every exported run (its merged HF folder): n samples per held-out prompt (vLLM
engines on Ray actors, started once and given each model's weights in turn; a seed per request) and a
greedy answer per knowledge probe; then one Ray Data scoring pass for every run under its policy and the
reference (KL on the policy's samples, held-out preference accuracy from the implicit reward, knowledge-probe NLL),
an optional reward model, the pure metrics of `ropo_ray.eval.metrics`, hyperspherical energy per adapted
layer (ROPO_SPEC section 4), and the report (`report.json` + a self-contained `report.html`). The
diagnostics are those with which arXiv 2508.17637 (section 1) describes DPO's reward hacking: longer
answers, lost diversity, forgotten knowledge, and "neuron collapse" (a rise of hyperspherical energy).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ropo_ray.config import Config, load_config
from ropo_ray.data.task import probe_correct, verify
from ropo_ray.data.tokenize import encode_completion, encode_prompt
from ropo_ray.eval import metrics as M
from ropo_ray.eval.energy import hyperspherical_energy
from ropo_ray.eval.sampling import SamplingEngines, sample_requests
from ropo_ray.storage import Store, store

Log = Callable[[str], None]


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file; a bad line or a missing field is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def eval_inputs(cfg: Config, reference_dir: Path) -> tuple[list[dict], list[dict]]:
    """Held-out prompts ({"prompt", "answer"?}) and knowledge probes ({"prompt", "answer", "response"})."""
    task = reference_dir / "task"
    prompts_file = cfg.eval.prompts_file or (str(task / "heldout.jsonl") if (task / "heldout.jsonl").exists() else "")
    probes_file = cfg.eval.probes_file or (str(task / "probes.jsonl") if (task / "probes.jsonl").exists() else "")
    if not prompts_file:
        raise ValueError("eval.prompts_file: set it to a JSONL of held-out prompts (the model has no built-in task)")
    prompts = read_jsonl(prompts_file, ("prompt",))
    if cfg.eval.num_prompts:
        prompts = prompts[: cfg.eval.num_prompts]
    probes = read_jsonl(probes_file, ("prompt", "answer", "response")) if probes_file else []
    return prompts, probes


def user_prompt_ids(tokenizer: Any, items: list[dict]) -> list[list[int]]:
    """Each item's "prompt" as a one-turn user conversation, tokenised as training tokenises prompts."""
    return [encode_prompt(tokenizer, [{"role": "user", "content": item["prompt"]}]) for item in items]


def read_run(export: Path) -> dict[str, Any]:
    """An exported training run: its config, merged folder, trainable-parameter count and metric log."""
    from safetensors import safe_open

    from ropo_ray.train.ray_trainer import read_metrics

    cfg = load_config(export / "config.yaml", [])
    with safe_open(str(export / "adapter.safetensors"), "pt") as f:  # headers only: no weights are read
        trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"cfg": cfg, "merged": export / "merged", "export": export, "trainable": trainable,
            "training": read_metrics(export / "metrics.jsonl")}


def run_names(runs: list[dict[str, Any]]) -> list[str]:
    """`adapter-loss` per run, made unique with a counter when two runs share it."""
    names: list[str] = []
    for run in runs:
        base = f"{run['cfg'].adapter.type}-{run['cfg'].loss.type}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def adapted_layers(state_keys: list[str], cfg: Config) -> list[str]:
    """Weight names of the linear layers a run adapted (every projection for full-weight training)."""
    projections = [k for k in state_keys if k.endswith("_proj.weight") and ".layers." in k]
    if cfg.adapter.type == "full":
        return sorted(projections)
    return sorted(k for k in projections if k.split(".")[-2] in cfg.adapter.target_modules)


def weight_energies(folder: Path, names: list[str] | None = None, cfg: Config | None = None) -> dict[str, float]:
    """HE of the named weights of a safetensors folder (or of the layers `cfg` adapts), reading one tensor
    at a time, so a large model is never loaded whole."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            wanted = names if names is not None else adapted_layers(list(f.keys()), cfg)
            out.update({n: hyperspherical_energy(f.get_tensor(n)) for n in wanted if n in f.keys()})
    return out


def layer_energies(reference_dir: Path, merged_dir: Path, cfg: Config, reference: dict[str, float]
                   ) -> list[dict[str, Any]]:
    """HE of each adapted layer's weight in the reference and in the merged policy, and the change.
    `reference` holds the reference's energies already computed (for earlier runs) and is filled in."""
    policy = weight_energies(merged_dir, cfg=cfg)
    missing = [n for n in policy if n not in reference]
    if missing:
        reference.update(weight_energies(reference_dir, missing))
    strip = len(".weight")
    return M.energy_change({n[:-strip]: reference[n] for n in policy}, {n[:-strip]: e for n, e in policy.items()})


def sample_model(model_dir: Path, prompt_ids: list[list[int]], probe_ids: list[list[int]], cfg: Config,
                 engines: SamplingEngines) -> dict[str, Any]:
    """vLLM samples of `model_dir` on `engines` (shared by the models of one evaluation): n per held-out
    prompt, and one greedy answer per probe."""
    rows = sample_requests(prompt_ids, cfg.eval, "sample", cfg.eval.samples_per_prompt)
    rows += sample_requests(probe_ids, cfg.eval, "probe", 1, greedy=True)
    out = engines.generate(model_dir, rows)
    return {"samples": [r for r in out if r["kind"] == "sample"], "probes": [r for r in out if r["kind"] == "probe"]}


def sample_metrics(samples: list[dict], prompts: list[dict], eos_id: int) -> dict[str, Any]:
    """Length, stopping, diversity and task reward of one model's samples (no second model needed)."""
    tokens = [[t for t in s["tokens"] if t != eos_id] for s in samples]  # EOS is not a word
    groups: dict[int, list[list[int]]] = {}
    for s, toks in zip(samples, tokens):
        groups.setdefault(s["prompt_index"], []).append(toks)
    verifiable = all("answer" in p for p in prompts)
    rewards = [float(verify(prompts[s["prompt_index"]], s["text"])) for s in samples] if verifiable else None
    return {"lengths": [len(s["tokens"]) for s in samples], "rewards": rewards,
            "stopped_fraction": sum(bool(s["tokens"]) and s["tokens"][-1] == eos_id for s in samples) / len(samples),
            "distinct_1": M.distinct_n(tokens, 1), "distinct_2": M.distinct_n(tokens, 2),
            "self_bleu": M.self_bleu_grouped(list(groups.values()))}


def scoring_rows(samples: list[dict], prompt_ids: list[list[int]], probes: list[dict], probe_ids: list[list[int]],
                 pairs: list[dict], tokenizer: Any) -> list[dict[str, Any]]:
    """Rows scored under policy and reference: the policy's samples (KL), the probes' canonical answers
    (knowledge NLL) and the held-out pairs' chosen and rejected answers (implicit-reward accuracy)."""
    rows = [{"kind": "sample", "index": i, "prompt": prompt_ids[s["prompt_index"]], "completion": s["tokens"]}
            for i, s in enumerate(samples)]
    rows += [{"kind": "probe", "index": i, "prompt": ids, "completion": encode_completion(tokenizer, p["response"])}
             for i, (p, ids) in enumerate(zip(probes, probe_ids))]
    for i, pair in enumerate(pairs):
        rows.append({"kind": "chosen", "index": i, "prompt": pair["prompt_ids"], "completion": pair["chosen_ids"]})
        rows.append({"kind": "rejected", "index": i, "prompt": pair["prompt_ids"], "completion": pair["rejected_ids"]})
    return [r for r in rows if r["completion"]]


def scored_metrics(scored: list[dict], probes: list[dict]) -> dict[str, Any]:
    """KL on the policy's samples, implicit-reward accuracy on held-out pairs, knowledge NLL per token of
    both models (reference's NLL is reported in the reference block)."""
    by_kind: dict[str, list[dict]] = {}
    for r in scored:
        by_kind.setdefault(r["kind"], []).append(r)
    samples = by_kind.get("sample", [])
    kl = M.kl_estimates([r["policy_logp"] for r in samples], [r["reference_logp"] for r in samples])
    chosen = {r["index"]: r for r in by_kind.get("chosen", [])}
    margins = [(c["policy_logp"] - c["reference_logp"]) - (r["policy_logp"] - r["reference_logp"])
               for r in by_kind.get("rejected", []) if (c := chosen.get(r["index"])) is not None]
    probe_rows = by_kind.get("probe", [])
    tokens = sum(len(r["completion"]) for r in probe_rows)
    nll = {name: (-sum(r[f"{name}_logp"] for r in probe_rows) / tokens if tokens else None)
           for name in ("policy", "reference")}
    return {"kl": kl, "preference_accuracy": M.mean_or_none([float(m > 0) for m in margins]),
            "knowledge_nll": nll["policy"], "reference_knowledge_nll": nll["reference"]}


def knowledge_accuracy(answers: list[dict], probes: list[dict]) -> float | None:
    """Fraction of greedy probe answers that name the expected attribute."""
    if not probes:
        return None
    return sum(probe_correct(p, a["text"]) for p, a in zip(probes, answers)) / len(probes)


def write_samples(sampled: dict[str, dict[str, list[dict]]], path: Store) -> None:
    """Every sample and probe answer of every model, one JSON line each (written whole)."""
    path.write_text("".join(json.dumps({"model": model, **row}, ensure_ascii=False) + "\n"
                            for model, parts in sampled.items() for row in parts["samples"] + parts["probes"]))


def sweep_tables(run_dir: Store) -> list[Store]:
    """The sweeps' results tables, <run_dir>/sweep/*/results.parquet, oldest first."""
    tables = [t for t in (s.child("results.parquet") for s in run_dir.child("sweep").folders()) if t.is_file()]
    return sorted(tables, key=lambda t: t.fs.get_file_info(t.path).mtime_ns or 0)


def sweep_section(run_dir: Store, cfg: Config) -> dict[str, Any] | None:
    """The newest sweep table under <run_dir>/sweep, as the report's sweep section (None if no sweep ran)."""
    import pyarrow.parquet as pq

    from ropo_ray.tune.sweep import METRIC, OBJECTIVE_MODES, pick_best

    tables = sweep_tables(run_dir)
    if not tables:
        return None
    rows = pq.read_table(tables[-1].path, filesystem=tables[-1].fs).to_pylist()
    mode = OBJECTIVE_MODES[cfg.tune.objective]
    try:
        best = pick_best(rows, mode)
    except RuntimeError:
        best = {}
    searched = [k for k in rows[0] if "." in k]
    clean = [{"trial": str(r.get("trial_id")), "status": str(r.get("status")),
              **{k: v if isinstance(v, (int, float, str)) or v is None else str(v)
                 for k, v in r.items() if k not in ("trial_id", "status", "run", "error")}} for r in rows]
    return {"objective": METRIC, "mode": mode, "rows": clean, "best": {k: best.get(k) for k in searched}}


def held_out_pairs(prepared: str | Path | Store | None) -> list[dict]:
    """The prepared held-out split (token ids), or nothing when there is none."""
    dataset = store(prepared).child("eval").parquet_dataset() if prepared is not None else None
    if dataset is None:
        return []
    return dataset.to_table(columns=["prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()


def _block(base: dict, ref_base: dict, extra: dict[str, Any]) -> dict[str, Any]:
    """A report metrics block from sample metrics (`base`), the reference's, and scored extras."""
    mean_len = M.length_stats(base["lengths"])["mean"]
    block = {"task_reward": M.mean_or_none(base["rewards"] or []), "reward_model_score": None,
             "win_rate": None, "win_rate_by": None, "wins": None, "ties": None, "losses": None,
             "mean_length": mean_len, "length_ratio": M.length_ratio(base["lengths"], ref_base["lengths"]),
             "stopped_fraction": base["stopped_fraction"], "distinct_1": base["distinct_1"],
             "distinct_2": base["distinct_2"], "self_bleu": base["self_bleu"], "kl_to_reference": None,
             "kl_k3": None, "kl_stderr": None, "preference_accuracy": None, "knowledge_accuracy": None,
             "knowledge_nll": None, "energy_change_mean": None, "samples": len(base["lengths"])}
    block.update(extra)
    return block


def _win(policy: list[float] | None, reference: list[float] | None, by: str) -> dict[str, Any]:
    if not policy or not reference:
        return {}
    w = M.win_rate(policy, reference)
    return {"win_rate": w["win_rate"], "win_rate_by": by, "wins": w["wins"], "ties": w["ties"], "losses": w["losses"]}


def _examples(samples: list[dict], prompts: list[dict], rewards: list[float] | None, count: int) -> list[dict]:
    firsts = [i for i, s in enumerate(samples) if s["sample_index"] == 0][:count]
    return [{"prompt": prompts[samples[i]["prompt_index"]]["prompt"], "response": samples[i]["text"],
             "reward": None if rewards is None else rewards[i]} for i in firsts]


def evaluate(cfg: Config, reference_dir: Path, tokenizer_path: Path, exports: list[str | Path | Store],
             prepared: str | Path | Store | None, out_dir: str | Path | Store, log: Log = print) -> dict[str, Any]:
    """Sample, score and report the reference and every exported run; returns the report's paths and dict.

    Exports and the report folder may be object-store URIs: exports are downloaded once into the
    local mirror (transformers and vLLM read local files), the report is written straight there."""
    from ropo_ray.eval.report import write_report
    from ropo_ray.eval.scoring import score_logps, score_rewards
    from ropo_ray.runs import mirror_dir, run_store
    from ropo_ray.train.model_io import load_tokenizer

    out_dir = store(out_dir)
    fingerprint = evaluation_fingerprint(cfg, reference_dir, exports)
    published = published_report(out_dir, fingerprint)
    if published is not None:
        log(f"evaluate: the report in {out_dir} is up to date (same runs, reference and settings)")
        return published
    timing: dict[str, float] = {}
    clock = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    prompts, probes = eval_inputs(cfg, reference_dir)
    prompt_ids, probe_ids = user_prompt_ids(tokenizer, prompts), user_prompt_ids(tokenizer, probes)
    runs = [read_run(store(e).local_copy(mirror_dir(cfg), marker="run.json")) for e in exports]
    names = run_names(runs)
    pairs = held_out_pairs(prepared)
    eos = tokenizer.eos_token_id

    sampled = {}
    with SamplingEngines(cfg.eval) as engines:
        for name, folder in [("reference", reference_dir), *((n, r["merged"]) for n, r in zip(names, runs))]:
            log(f"evaluate: sampling {name} with vLLM ({len(prompts)} prompts x {cfg.eval.samples_per_prompt}, "
                f"{len(probes)} probes greedy)")
            sampled[name] = sample_model(folder, prompt_ids, probe_ids, cfg, engines)
            timing[f"sample {name}"] = time.perf_counter() - clock
            clock = time.perf_counter()
        log(f"evaluate: {len(sampled)} models sampled with {engines.starts} engine start(s) and "
            f"{engines.reloads} weight reload(s)")
    base = {name: sample_metrics(s["samples"], prompts, eos) for name, s in sampled.items()}
    write_samples(sampled, out_dir.child("samples.jsonl"))

    rewards: dict[str, list[float] | None] = {name: b["rewards"] for name, b in base.items()}
    by = "task_reward"
    if cfg.eval.reward_model:
        log(f"evaluate: scoring every sample with the reward model {cfg.eval.reward_model}")
        flat = [{"prompt_text": prompts[s["prompt_index"]]["prompt"], "text": s["text"]}
                for name in sampled for s in sampled[name]["samples"]]
        scores = iter(score_rewards(flat, cfg.eval.reward_model, cfg.model, cfg.eval.score_batch_size))
        rewards = {name: [next(scores) for _ in sampled[name]["samples"]] for name in sampled}
        by = "reward_model"
        timing["reward model"] = time.perf_counter() - clock
        clock = time.perf_counter()

    rows = [{**row, "run": name} for name in names
            for row in scoring_rows(sampled[name]["samples"], prompt_ids, probes, probe_ids, pairs, tokenizer)]
    by_run: dict[str, list[dict]] = {name: [] for name in names}
    if rows:
        log(f"evaluate: scoring {len(runs)} run(s) under policy and reference in one pass (KL, preference "
            "accuracy, knowledge NLL)")
        for row in score_logps(rows, reference_dir, {n: r["merged"] for n, r in zip(names, runs)}, cfg.model,
                               cfg.eval.score_batch_size):
            by_run[row["run"]].append(row)
    timing["score (every run)"] = time.perf_counter() - clock
    clock = time.perf_counter()

    report_runs, reference_nll, reference_energy = [], None, {}
    for name, run in zip(names, runs):
        scored = scored_metrics(by_run[name], probes)
        reference_nll = scored["reference_knowledge_nll"]
        energy = layer_energies(reference_dir, run["merged"], run["cfg"], reference_energy)
        extra = {"kl_to_reference": scored["kl"]["k1"], "kl_k3": scored["kl"]["k3"],
                 "kl_stderr": scored["kl"]["k1_stderr"], "preference_accuracy": scored["preference_accuracy"],
                 "knowledge_accuracy": knowledge_accuracy(sampled[name]["probes"], probes),
                 "knowledge_nll": scored["knowledge_nll"],
                 "energy_change_mean": M.mean_or_none([e["relative_change"] for e in energy]),
                 **_win(rewards[name], rewards["reference"], by)}
        if by == "reward_model":
            extra["reward_model_score"] = M.mean_or_none(rewards[name] or [])
        report_runs.append({
            "name": name, "adapter": run["cfg"].adapter.type, "loss": run["cfg"].loss.type,
            "model_dir": str(run["merged"]), "trainable_parameters": run["trainable"],
            "metrics": _block(base[name], base["reference"], extra), "lengths": base[name]["lengths"],
            "examples": _examples(sampled[name]["samples"], prompts, rewards[name], cfg.eval.examples),
            "energy": energy, "training": run["training"]})
        timing[f"energy and metrics {name}"] = time.perf_counter() - clock
        clock = time.perf_counter()

    ref_extra = {"knowledge_accuracy": knowledge_accuracy(sampled["reference"]["probes"], probes),
                 "knowledge_nll": reference_nll, "kl_to_reference": 0.0}
    if by == "reward_model":
        ref_extra["reward_model_score"] = M.mean_or_none(rewards["reference"] or [])
    report = {
        "schema_version": 1, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "built-in arithmetic task" if not cfg.eval.prompts_file else str(cfg.eval.prompts_file),
        "settings": {"engine": "vllm", "samples_per_prompt": cfg.eval.samples_per_prompt,
                     "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p, "max_tokens": cfg.eval.max_tokens,
                     "seed": cfg.eval.seed, "num_prompts": len(prompts), "num_probes": len(probes),
                     "reward_model": cfg.eval.reward_model or None},
        "reference": {"name": "reference", "model_dir": str(reference_dir),
                      "metrics": _block(base["reference"], base["reference"], ref_extra),
                      "lengths": base["reference"]["lengths"],
                      "examples": _examples(sampled["reference"]["samples"], prompts, rewards["reference"],
                                            cfg.eval.examples)},
        "runs": report_runs, "sweep": sweep_section(run_store(cfg), cfg), "timing": timing,
    }
    paths = write_report(report, out_dir)
    out_dir.child("manifest.json").write_json({"fingerprint": fingerprint})  # last
    log(f"evaluate: report in {paths['html']} (and report.json beside it)")
    return {"report": report, "paths": {k: v.location for k, v in paths.items()}}


def evaluation_fingerprint(cfg: Config, reference_dir: Path, exports: list[str | Path | Store]) -> str:
    """What a report depends on: the eval settings, the reference's weights and every run's trained weights."""
    from dataclasses import asdict

    from ropo_ray.fingerprint import hash_json, model_fingerprint
    from ropo_ray.runs import run_store

    settings = {k: v for k, v in asdict(cfg.eval).items() if k not in ("runs", "report_dir")}
    runs = [{"path": store(e).display(), "adapter": store(e).child("adapter.safetensors").sha256()} for e in exports]
    sweeps = [t.display() for t in sweep_tables(run_store(cfg))]
    return hash_json({"eval": settings, "reference": model_fingerprint(reference_dir), "runs": runs,
                      "model": asdict(cfg.model), "sweep": str(sorted(sweeps)), "schema_version": 1})


def published_report(out_dir: str | Path | Store, fingerprint: str) -> dict[str, Any] | None:
    """The report in out_dir if its manifest (written after the report) carries `fingerprint`."""
    out_dir = store(out_dir)
    manifest, paths = out_dir.child("manifest.json"), {"json": out_dir.child("report.json"),
                                                       "html": out_dir.child("report.html")}
    if not manifest.is_file() or not all(p.is_file() for p in paths.values()):
        return None
    if manifest.read_json().get("fingerprint") != fingerprint:
        return None
    return {"report": paths["json"].read_json(), "paths": {k: v.location for k, v in paths.items()}, "reused": True}
