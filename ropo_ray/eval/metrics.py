"""Pure metric functions of the evaluation: diversity, KL to the reference, win rate, lengths, energy.

Everything here takes plain Python sequences (token ids or words, floats) and returns floats or dicts,
so the metrics are testable by hand and import neither ray, vllm, deepspeed nor torch.

Diversity (RoPO, arXiv 2508.17637, argues DPO-style training loses it):
    distinct-n   Li et al. 2016, arXiv 1510.03055 (corpus level: unique n-grams / all n-grams)
    Self-BLEU    Zhu et al. 2018, Texygen, arXiv 1802.01886 (mean BLEU of each sample against the others)
    BLEU         Papineni et al. 2002, smoothed with Chen & Cherry 2014 method 1 (see `sentence_bleu`)
KL(policy || reference) from policy samples: Schulman 2020, http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

Tokens = Sequence[Hashable]  # one sample: token ids or words

# Chen & Cherry 2014 (WMT), smoothing method 1: a zero matched-n-gram count becomes this numerator.
BLEU_EPSILON = 0.1


def _ngrams(tokens: Tokens, n: int) -> Counter:
    """Counts of the n-grams of one sample (empty when len(tokens) < n)."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(samples: Sequence[Tokens], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016, arXiv 1510.03055).

        distinct-n = |unique n-grams over all samples| / (number of n-grams over all samples)

    Samples shorter than n contribute no n-grams; 0.0 when there are none at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts: Counter = Counter()
    for sample in samples:
        counts.update(_ngrams(sample, n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def _closest_length(hyp_len: int, ref_lens: Iterable[int]) -> int:
    """The reference length closest to the hypothesis length; a tie goes to the shorter one."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _bleu(matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int) -> float:
    """BLEU from clipped matches and hypothesis n-gram totals per order 1..N (see `sentence_bleu`)."""
    if hyp_len == 0:
        return 0.0
    log_p = 0.0
    for m, t in zip(matches, totals):
        log_p += math.log((m if m > 0 else BLEU_EPSILON) / max(t, 1))
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p / len(matches))


def sentence_bleu(hypothesis: Tokens, references: Sequence[Tokens], max_n: int = 4) -> float:
    """Smoothed sentence BLEU (Papineni et al. 2002) of one hypothesis against several references.

        BLEU = BP * exp( sum_{n=1..N} (1/N) log p_n ),   N = max_n
        p_n  = sum_g min(count_hyp(g), max_ref count_ref(g)) / (number of hypothesis n-grams)
        BP   = 1 if c > r else exp(1 - r / c),   c = |hyp|, r = the reference length closest to c (tie: shorter)

    Rules where the paper leaves it open (all tested):
      * smoothing: Chen & Cherry 2014 method 1, a zero numerator becomes BLEU_EPSILON = 0.1 (p_n = 0.1 / t_n);
        applied to every order, unigrams included (NLTK instead returns 0 when no unigram matches).
      * N stays max_n however short the hypothesis: an order with no hypothesis n-grams (len < n) has
        0 / 0 and counts as a zero match over one n-gram, p_n = 0.1 / 1. Short hypotheses are penalised.
      * an empty hypothesis scores 0.0 (BP would divide by c = 0).
    """
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    matches, totals = [], []
    for n in range(1, max_n + 1):
        hyp = _ngrams(hypothesis, n)
        best: Counter = Counter()
        for ref in references:
            best |= _ngrams(ref, n)  # | keeps the max count per n-gram: clipping by the single best reference
        matches.append(sum(min(c, best[g]) for g, c in hyp.items()))
        totals.append(sum(hyp.values()))
    return _bleu(matches, totals, len(hypothesis), _closest_length(len(hypothesis), (len(r) for r in references)))


def _leave_one_out_max(counts: Sequence[Counter]) -> dict[tuple, tuple[int, int, int]]:
    """Per n-gram: (largest count, index of a sample holding it, second largest count) over the samples.

    The max count among all samples but i is then the second largest if i holds the largest, else the
    largest; this makes Self-BLEU linear in the corpus size instead of quadratic.
    """
    best: dict[tuple, tuple[int, int, int]] = {}
    for i, sample_counts in enumerate(counts):
        for g, c in sample_counts.items():
            top, owner, second = best.get(g, (0, -1, 0))
            best[g] = (c, i, top) if c > top else (top, owner, max(second, c))
    return best


def self_bleu(samples: Sequence[Tokens], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen, arXiv 1802.01886): mean over samples of `sentence_bleu`(sample,
    all the other samples). Higher means less diverse. Fewer than 2 samples -> 0.0 (no references).

    Same value as the leave-one-out loop over `sentence_bleu`, computed in one pass per n-gram order.
    """
    k = len(samples)
    if k < 2:
        return 0.0
    matches = [[0] * max_n for _ in range(k)]  # [k, N]
    totals = [[0] * max_n for _ in range(k)]  # [k, N]
    for n in range(1, max_n + 1):
        counts = [_ngrams(s, n) for s in samples]
        best = _leave_one_out_max(counts)
        for i, sample_counts in enumerate(counts):
            for g, c in sample_counts.items():
                top, owner, second = best[g]
                matches[i][n - 1] += min(c, second if owner == i else top)
            totals[i][n - 1] = sum(sample_counts.values())
    lengths = [len(s) for s in samples]
    scores = [
        _bleu(matches[i], totals[i], lengths[i], _closest_length(lengths[i], lengths[:i] + lengths[i + 1:]))
        for i in range(k)
    ]
    return sum(scores) / k


def self_bleu_grouped(groups: Sequence[Sequence[Tokens]], max_n: int = 4) -> float:
    """Mean over groups (the samples of one prompt each) of `self_bleu`; groups of < 2 samples are skipped.

    0.0 when no group has 2 samples.
    """
    values = [self_bleu(g, max_n) for g in groups if len(g) >= 2]
    return sum(values) / len(values) if values else 0.0


def _exp_minus_one_minus(x: float) -> float:
    """e^x - 1 - x, accurate near 0 (expm1) and inf rather than OverflowError for huge x."""
    try:
        return math.expm1(x) - x
    except OverflowError:
        return math.inf


def kl_estimates(policy_logps: Sequence[float], ref_logps: Sequence[float]) -> dict[str, float]:
    """Monte-Carlo KL(policy || reference) from samples x ~ policy (Schulman 2020, "Approximating KL").

    Inputs are the summed sequence log-probs of each sample under policy (lp) and reference (lr), shape [n].
    With log r = lr - lp:
        k1 = mean(-log r)                 unbiased, high variance, can be negative
        k3 = mean((r - 1) - log r)        unbiased (E_p[r] = 1), never negative, lower variance
        k1_stderr = std(-log r, ddof=1) / sqrt(n)   (0.0 when n < 2)
    """
    if len(policy_logps) != len(ref_logps):
        raise ValueError(f"policy_logps has {len(policy_logps)} items, ref_logps has {len(ref_logps)} items")
    n = len(policy_logps)
    if n == 0:
        raise ValueError("kl_estimates needs at least one sample")
    log_r = [lr - lp for lp, lr in zip(policy_logps, ref_logps)]  # [n]
    k1 = -sum(log_r) / n
    k3 = sum(_exp_minus_one_minus(x) for x in log_r) / n
    if n < 2:
        stderr = 0.0
    else:
        var = sum((-x - k1) ** 2 for x in log_r) / (n - 1)
        stderr = math.sqrt(var / n)
    return {"k1": k1, "k3": k3, "k1_stderr": stderr, "n": n}


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float],
             tie_tolerance: float = 0.0) -> dict[str, float]:
    """Paired win rate of the policy over the reference (item i of both: same prompt, same sample index).

    win: p - r > tol, tie: |p - r| <= tol, loss otherwise; win_rate = (wins + ties / 2) / n.
    """
    if len(policy_scores) != len(reference_scores):
        raise ValueError(
            f"policy_scores has {len(policy_scores)} items, reference_scores has {len(reference_scores)} items")
    n = len(policy_scores)
    if n == 0:
        raise ValueError("win_rate needs at least one pair")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    diffs = [p - r for p, r in zip(policy_scores, reference_scores)]
    ties = sum(abs(d) <= tie_tolerance for d in diffs)
    wins = sum(d > tie_tolerance for d in diffs)
    losses = n - wins - ties
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins / n, "ties": ties / n, "losses": losses / n, "n": n}


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """mean, median, p90, min, max, n of completion lengths; p90 by nearest rank (the ceil(0.9 n)-th smallest)."""
    n = len(lengths)
    if n == 0:
        raise ValueError("length_stats needs at least one length")
    s = sorted(lengths)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    rank = (9 * n + 9) // 10  # ceil(0.9 n) in integers: no float rounding at exact multiples
    return {"mean": sum(s) / n, "median": float(median), "p90": float(s[rank - 1]),
            "min": float(s[0]), "max": float(s[-1]), "n": n}


def length_ratio(policy_lengths: Sequence[int], reference_lengths: Sequence[int]) -> float:
    """mean(policy lengths) / mean(reference lengths): > 1 means the policy got more verbose."""
    if not policy_lengths or not reference_lengths:
        raise ValueError("length_ratio needs non-empty policy and reference lengths")
    ref_mean = sum(reference_lengths) / len(reference_lengths)
    if ref_mean == 0:
        raise ValueError("reference lengths are all zero: the ratio is undefined")
    return (sum(policy_lengths) / len(policy_lengths)) / ref_mean


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin [e_i, e_{i+1}), the last bin closed [e_{-2}, e_{-1}]; values outside are not counted."""
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be >= 2 strictly increasing values, got {list(edges)}")
    counts = [0] * (len(edges) - 1)
    lo, hi = edges[0], edges[-1]
    for v in values:
        if lo <= v < hi:
            counts[_bin_index(v, edges)] += 1
        elif v == hi:
            counts[-1] += 1
    return counts


def _bin_index(v: float, edges: Sequence[float]) -> int:
    """Largest i with edges[i] <= v (v within [edges[0], edges[-1]))."""
    lo, hi = 0, len(edges) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if edges[mid] <= v else (lo, mid)
    return lo


def shared_edges(*value_lists: Sequence[float], bins: int = 20) -> list[float]:
    """At most `bins` equal-width bins of integer width covering every list (policy vs reference lengths).

    With lo = floor(min), K = floor(max) - lo + 1 integers to cover: width w = ceil(K / bins), and
    m = ceil(K / w) bins; edges lo, lo + w, ..., lo + m w. The top edge lies above the max, so for integer
    data every bin holds exactly w integer values (the closed last bin gets no extra one).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = [v for vs in value_lists for v in vs]
    if not values:
        raise ValueError("shared_edges needs at least one value")
    lo = math.floor(min(values))
    k = math.floor(max(values)) - lo + 1
    width = -(-k // bins)
    m = -(-k // width)
    return [float(lo + i * width) for i in range(m + 1)]


def energy_change(reference: dict[str, float], policy: dict[str, float]) -> list[dict[str, Any]]:
    """Per layer (sorted by name): hyperspherical energy of reference and policy, and its change.

    relative_change = change / reference (0.0 when reference == 0). RoPO expects ~0 (ROPO_SPEC.md section 4).
    """
    only_ref, only_policy = sorted(reference.keys() - policy.keys()), sorted(policy.keys() - reference.keys())
    if only_ref or only_policy:
        raise ValueError(f"layers differ: only in reference {only_ref}, only in policy {only_policy}")
    rows = []
    for name in sorted(reference):
        change = policy[name] - reference[name]
        rows.append({"layer": name, "reference": reference[name], "policy": policy[name], "change": change,
                     "relative_change": change / reference[name] if reference[name] != 0 else 0.0})
    return rows


def mean_or_none(values: Iterable[float]) -> float | None:
    """Mean of the values, None when there are none (for report cells that may be empty)."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else None
