"""The built-in demo task: verifiable arithmetic with a verbosity confound, plus invented facts.

Why this task: it makes the RoPO paper's claims (ROPO_SPEC section 4) measurable on a model small
enough to train here in a minute.

- Arithmetic ("What is 7 + 12?") has a programmatic verifier: the last integer of a response.
  Answers come in several phrasings, so diversity can be measured and can collapse.
- The preference pairs carry a verbosity confound: the chosen (correct) answer is usually wrapped
  in digit-free filler, the rejected (wrong) one usually not. DPO can raise the margin by learning
  "be long" as well as "be right", so length can drift (reward hacking).
- The SFT corpus also states facts about invented people (home town, hat colour) that the pairs
  never mention; the probe set asks them back, so forgetting caused by preference training shows.
- Held-out problems (combinations absent from both SFT corpus and pairs) test generalisation.

Everything is drawn from `random.Random` streams seeded by strings built from `TaskConfig.seed`
(string seeds hash with SHA-512, so runs are reproducible whatever PYTHONHASHSEED is).
Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ropo_ray.config.schema import TaskConfig

Problem = tuple[int, str, int]  # (a, op, b), op in {"+", "-"}

PROMPT_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?")
ANSWER_TEMPLATES = ("The answer is {c}.", "{a} {op} {b} = {c}.", "It is {c}.", "{c}", "That gives {c}.")
FILLER_PREFIXES = (
    "Sure! Let me work through this carefully.",
    "Great question, let me think about it step by step.",
    "Of course, happy to help with this one.",
    "Let me take a moment to think this through properly.",
)
FILLER_SUFFIXES = (
    "I hope this helps, and feel free to ask more!",
    "Let me know if you would like me to explain further.",
    "Working through sums like this is always a pleasure.",
    "Please double check it if it matters to you.",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
FACT_TEMPLATES = (  # (attribute, question, answer): two phrasings per attribute
    ("town", "Where does {e} live?", "{e} lives in {v}."),
    ("town", "Which town is {e} from?", "{e} is from {v}."),
    ("colour", "What colour is {e}'s hat?", "{e}'s hat is {v}."),
    ("colour", "What is the colour of {e}'s hat?", "The hat of {e} is {v}."),
)
_SYLLABLES = ("zor", "vak", "tel", "mir", "dra", "kos", "lun", "bex", "qua", "rin", "tho", "gal",
              "fen", "ysh", "pol", "nar", "ska", "wid", "jur", "ome", "tav", "kel", "bri", "sul")
_TOWN_ENDINGS = ("ell", "ford", "holm", "wick", "mere", "stead")
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class TaskData:
    """Everything the task generates; rows are plain dicts so they serialise to JSONL as they are."""

    sft: list[dict]
    """SFT rows: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}."""
    pairs: list[dict]
    """Preference pairs: {"prompt", "chosen", "rejected"} (raw user text, raw responses)."""
    heldout: list[dict]
    """Held-out arithmetic: {"prompt", "answer": int}; combinations in neither sft nor pairs."""
    probes: list[dict]
    """Knowledge probes: {"prompt", "answer": str (the attribute), "response": canonical answer}."""
    entities: tuple[str, ...]
    """Invented people (never in a pair)."""
    towns: tuple[str, ...]
    """Invented towns (never in a pair)."""


def extract_answer(response: str) -> int | None:
    """The last integer in `response` (filler never holds digits), or None if there is none."""
    found = _INT.findall(response)
    return int(found[-1]) if found else None


def verify(problem: dict, response: str) -> bool:
    """Programmatic reward: does the response's last integer equal the problem's answer?"""
    return extract_answer(response) == int(problem["answer"])


def probe_correct(probe: dict, response: str) -> bool:
    """The expected attribute (town / colour) appears in the response as a whole word."""
    return re.search(rf"\b{re.escape(str(probe['answer']))}\b", response, flags=re.IGNORECASE) is not None


def solve(problem: Problem) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def all_problems(max_operand: int) -> list[Problem]:
    """Every (a, op, b) with operands in [0, max_operand) and non-negative differences."""
    rng = range(max_operand)
    return [(a, "+", b) for a in rng for b in rng] + [(a, "-", b) for a in rng for b in rng if a >= b]


def _prompt(rng: random.Random, problem: Problem) -> str:
    a, op, b = problem
    return rng.choice(PROMPT_TEMPLATES).format(a=a, op=op, b=b)


def _response(rng: random.Random, problem: Problem, value: int, verbose: bool) -> str:
    """One phrasing of `value`; verbose wraps it in filler (prefix, suffix or both, never digits)."""
    a, op, b = problem
    core = rng.choice(ANSWER_TEMPLATES).format(a=a, op=op, b=b, c=value)
    if not verbose:
        return core
    shape = rng.choice(("prefix", "suffix", "both"))
    prefix = rng.choice(FILLER_PREFIXES) + " " if shape in ("prefix", "both") else ""
    suffix = " " + rng.choice(FILLER_SUFFIXES) if shape in ("suffix", "both") else ""
    return prefix + core + suffix


def _wrong(rng: random.Random, value: int) -> int:
    """A wrong but plausible answer: off by 1..3, never negative."""
    return rng.choice([value + d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])


def _template_words() -> set[str]:
    """Lower-cased words of every fixed text, so an invented name never collides with one."""
    texts = PROMPT_TEMPLATES + ANSWER_TEMPLATES + FILLER_PREFIXES + FILLER_SUFFIXES + COLOURS
    texts += tuple(q + " " + a for _, q, a in FACT_TEMPLATES)
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def _invent_names(rng: random.Random, count: int, ending: tuple[str, ...], taken: set[str]) -> list[str]:
    """`count` distinct capitalised names (two syllables + an optional ending) not in `taken`."""
    names: list[str] = []
    while len(names) < count:
        name = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + (rng.choice(ending) if ending else "")).capitalize()
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


def _knowledge(cfg: TaskConfig) -> tuple[list[str], list[str], list[dict]]:
    """Entities, towns, and one probe per (entity, fact template)."""
    rng = random.Random(f"ropo-task-{cfg.seed}-knowledge")
    taken = _template_words()
    entities = _invent_names(rng, cfg.num_entities, (), taken)
    towns = _invent_names(rng, max(4, cfg.num_entities // 4), _TOWN_ENDINGS, taken)
    probes = []
    for entity in entities:
        values = {"town": rng.choice(towns), "colour": rng.choice(COLOURS)}
        for attribute, question, answer in FACT_TEMPLATES:
            value = values[attribute]
            probes.append({"prompt": question.format(e=entity), "answer": value,
                           "response": answer.format(e=entity, v=value)})
    return entities, towns, probes


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _sft_rows(cfg: TaskConfig, train: list[Problem], probes: list[dict]) -> list[dict]:
    """Arithmetic answers (filler on a minority) plus every fact statement `fact_repeats` times."""
    rng = random.Random(f"ropo-task-{cfg.seed}-sft")
    rows = []
    for _ in range(cfg.num_sft_examples):
        problem = rng.choice(train)
        verbose = rng.random() < cfg.sft_filler_prob
        rows.append(_chat(_prompt(rng, problem), _response(rng, problem, solve(problem), verbose)))
    rows += [_chat(p["prompt"], p["response"]) for p in probes for _ in range(cfg.fact_repeats)]
    rng.shuffle(rows)
    return rows


def _pair_rows(cfg: TaskConfig, train: list[Problem]) -> list[dict]:
    """Chosen correct (verbose with p), rejected wrong (verbose with 1 - p): the confound."""
    rng = random.Random(f"ropo-task-{cfg.seed}-pairs")
    rows = []
    for _ in range(cfg.num_pairs):
        problem = rng.choice(train)
        value = solve(problem)
        chosen = _response(rng, problem, value, rng.random() < cfg.verbose_chosen_prob)
        rejected = _response(rng, problem, _wrong(rng, value), rng.random() >= cfg.verbose_chosen_prob)
        rows.append({"prompt": _prompt(rng, problem), "chosen": chosen, "rejected": rejected})
    return rows


def generate_task(cfg: TaskConfig) -> TaskData:
    """Generate the whole task from `cfg.seed`: same config, same bytes."""
    problems = all_problems(cfg.max_operand)
    split = random.Random(f"ropo-task-{cfg.seed}-split")
    split.shuffle(problems)
    heldout, train = problems[: cfg.num_heldout_prompts], problems[cfg.num_heldout_prompts:]
    entities, towns, probes = _knowledge(cfg)
    heldout_rows = [{"prompt": _prompt(split, p), "answer": solve(p)} for p in heldout]
    return TaskData(sft=_sft_rows(cfg, train, probes), pairs=_pair_rows(cfg, train), heldout=heldout_rows,
                    probes=probes, entities=tuple(entities), towns=tuple(towns))


def write_task(data: TaskData, folder: str | Path) -> None:
    """Write sft.jsonl, pairs.jsonl, heldout.jsonl and probes.jsonl (one JSON object a line)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "pairs", "heldout", "probes"):
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in getattr(data, name))
        (folder / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
