"""Evaluation metrics against values worked out by hand (in each docstring) or by an independent formula.

Notation for BLEU: p_n = clipped n-gram matches / hypothesis n-grams, c = hypothesis length, r = the
reference length closest to c, BP = 1 if c > r else exp(1 - r/c), eps = 0.1 (Chen & Cherry method 1).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from ropo_ray.eval.energy import hyperspherical_energy
from ropo_ray.eval.metrics import (
    distinct_n,
    energy_change,
    histogram,
    kl_estimates,
    length_ratio,
    length_stats,
    mean_or_none,
    self_bleu,
    self_bleu_grouped,
    sentence_bleu,
    shared_edges,
    win_rate,
)

TOL = 1e-12


# ---------------------------------------------------------------- distinct-n


def test_distinct_n_is_corpus_level() -> None:
    """samples [1,2,3], [1,2,4], [5].

    n=1: unigrams 1,2,3,1,2,4,5 -> 7 in all, unique {1,2,3,4,5} = 5 -> 5/7.
    n=2: (1,2),(2,3),(1,2),(2,4) -> 4 in all, 3 unique -> 3/4; [5] has no bigram.
    n=3: (1,2,3),(1,2,4) -> 2/2 = 1. n=4: no 4-gram at all -> 0.0.
    (The mean of per-sample distinct-1 would be 1.0, not 5/7.)
    """
    samples = [[1, 2, 3], [1, 2, 4], [5]]
    assert distinct_n(samples, 1) == pytest.approx(5 / 7, abs=TOL)
    assert distinct_n(samples, 2) == pytest.approx(3 / 4, abs=TOL)
    assert distinct_n(samples, 3) == pytest.approx(1.0, abs=TOL)
    assert distinct_n(samples, 4) == 0.0
    assert distinct_n([], 1) == 0.0


def test_distinct_n_words_and_bad_n() -> None:
    """["the","cat"], ["the","dog"]: 4 unigrams, 3 unique -> 3/4."""
    assert distinct_n([["the", "cat"], ["the", "dog"]], 1) == pytest.approx(0.75, abs=TOL)
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n([[1]], 0)


# ---------------------------------------------------------------- BLEU / Self-BLEU


def test_bleu_clips_by_the_single_best_reference() -> None:
    """hyp [7,7,7], refs [7,8,9] and [7,7,1], N=1.

    count_hyp(7) = 3, max over refs = 2 (second ref) -> p_1 = 2/3 (summing refs would give 3/3).
    c = 3, r = 3 -> BP = 1. BLEU = 2/3.
    """
    assert sentence_bleu([7, 7, 7], [[7, 8, 9], [7, 7, 1]], max_n=1) == pytest.approx(2 / 3, abs=TOL)


def test_bleu_brevity_penalty_and_closest_length_tie_goes_shorter() -> None:
    """(a) hyp [1,2], ref [1,2,3], N=1: p_1 = 1, c=2 < r=3 -> BP = exp(1 - 3/2) = exp(-0.5) = 0.6065306597.

    (b) hyp [1,2,3], refs [1,2] (len 2) and [1,2,3,4] (len 4), N=1: p_1 = 3/3, both refs at distance 1 from
    c=3 -> r = 2 (shorter); c > r -> BP = 1 -> BLEU = 1. (The longer one would give exp(-1/3) = 0.7165.)
    """
    assert sentence_bleu([1, 2], [[1, 2, 3]], max_n=1) == pytest.approx(0.6065306597126334, abs=TOL)
    assert sentence_bleu([1, 2, 3], [[1, 2], [1, 2, 3, 4]], max_n=1) == pytest.approx(1.0, abs=TOL)


def test_bleu_smoothing_method1() -> None:
    """hyp [1,2,3,4], ref [1,3,2,4], N=2.

    p_1 = 4/4. Bigrams of hyp (1,2),(2,3),(3,4); of ref (1,3),(3,2),(2,4): 0 matches -> p_2 = eps/3 = 0.1/3.
    c = r = 4 -> BP = 1. BLEU = sqrt(1 * 0.1/3) = sqrt(1/30) = 0.1825741858.
    No unigram match is smoothed too: hyp [1,2], ref [3,4], N=1 -> p_1 = 0.1/2 = 0.05.
    """
    assert sentence_bleu([1, 2, 3, 4], [[1, 3, 2, 4]], max_n=2) == pytest.approx(0.18257418583505536, abs=TOL)
    assert sentence_bleu([1, 2], [[3, 4]], max_n=1) == pytest.approx(0.05, abs=TOL)


def test_bleu_short_hypothesis_rule() -> None:
    """hyp [1,2], ref [1,2], N=4: N stays 4; orders 3 and 4 have no hypothesis n-gram (0/0) -> eps/1 each.

    p = (1, 1, 0.1, 0.1), BP = 1 -> BLEU = (0.01)^(1/4) = sqrt(0.1) = 0.3162277660.
    An empty hypothesis scores 0.0.
    """
    assert sentence_bleu([1, 2], [[1, 2]], max_n=4) == pytest.approx(0.31622776601683794, abs=TOL)
    assert sentence_bleu([], [[1, 2]], max_n=4) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        sentence_bleu([1], [])


def test_self_bleu_two_samples() -> None:
    """[1,2,3] vs [1,2,4], N=2: p_1 = 2/3 ({1,2} match), p_2 = 1/2 ((1,2) matches), c = r = 3, BP = 1.

    BLEU = sqrt(2/3 * 1/2) = sqrt(1/3) = 0.5773502692, the same both ways -> Self-BLEU = 1/sqrt(3).
    Identical samples: every p_n = 1 -> 1.0. Fewer than 2 samples -> 0.0.
    """
    assert self_bleu([[1, 2, 3], [1, 2, 4]], max_n=2) == pytest.approx(1 / math.sqrt(3), abs=TOL)
    assert self_bleu([[5, 6, 7, 8]] * 3, max_n=4) == pytest.approx(1.0, abs=TOL)
    assert self_bleu([[1, 2, 3]]) == 0.0
    assert self_bleu([]) == 0.0


def test_self_bleu_leaves_the_hypothesis_out() -> None:
    """N=1. (a) [1,2], [1,3], [4,4]: BLEU 1/2, 1/2, and eps/2 = 0.05 for [4,4] (no 4 elsewhere).

    Mean = 1.05 / 3 = 0.35.
    (b) [4,4], [4,4], [1,2]: each [4,4] finds count 2 in the other -> 1, 1; [1,2] -> 0.05. Mean = 2.05/3.
    (c) [4,4], [4,1], [2,3]: [4,4] clipped by the other's max count 1 -> 1/2 (its own count must not
    count); [4,1] -> 1/2; [2,3] -> 0.05. Mean = 0.35.
    """
    assert self_bleu([[1, 2], [1, 3], [4, 4]], max_n=1) == pytest.approx(0.35, abs=TOL)
    assert self_bleu([[4, 4], [4, 4], [1, 2]], max_n=1) == pytest.approx(2.05 / 3, abs=TOL)
    assert self_bleu([[4, 4], [4, 1], [2, 3]], max_n=1) == pytest.approx(0.35, abs=TOL)


def test_self_bleu_equals_leave_one_out_sentence_bleu() -> None:
    """The one-pass Self-BLEU equals the direct loop of sentence_bleu(sample, the others) on a random corpus."""
    rng = random.Random(0)
    samples = [[rng.randrange(6) for _ in range(rng.randrange(0, 12))] for _ in range(15)]
    direct = sum(sentence_bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)) / len(samples)
    assert self_bleu(samples) == pytest.approx(direct, abs=TOL)
    assert 0.0 < direct < 1.0


def test_self_bleu_grouped_skips_singletons() -> None:
    """Groups: {[1,2,3],[1,2,4]} -> 1/sqrt(3) (above); {[9]} skipped; {[5,6,7,8] x2} -> 1.0. N=2.

    Mean over the 2 kept groups = (0.5773502692 + 1) / 2 = 0.7886751346 (counting the singleton as 0 would
    give 0.5257834231).
    """
    groups = [[[1, 2, 3], [1, 2, 4]], [[9]], [[5, 6, 7, 8], [5, 6, 7, 8]]]
    assert self_bleu_grouped(groups, max_n=2) == pytest.approx((1 / math.sqrt(3) + 1) / 2, abs=TOL)
    assert self_bleu_grouped([[[1]], []]) == 0.0


# ---------------------------------------------------------------- KL estimators


def _categorical_logps(p: list[float], q: list[float], outcomes: list[int]) -> tuple[list[float], list[float]]:
    return [math.log(p[x]) for x in outcomes], [math.log(q[x]) for x in outcomes]


def test_kl_estimators_equal_exact_kl_on_an_exactly_proportional_sample() -> None:
    """p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2); samples [0,0,1,2] hold each outcome in proportion to p.

    Exact KL(p||q) = 1/2 log 2 + 1/4 log 1 + 1/4 log(1/2) = log(2)/4 = 0.1732867951.
    k1 = mean(log p - log q) = (log2 + log2 + 0 - log2)/4 = log(2)/4.
    k3 with r = q/p = (1/2, 1/2, 1, 2): r - 1 - log r = (log2 - 1/2) x2, 0, (1 - log2);
       mean = (2 log2 - 1 + 0 + 1 - log2)/4 = log(2)/4.
    k1 stderr: values L, L, 0, -L (L = log 2), mean L/4, deviations 3/4, 3/4, -1/4, -5/4 (x L),
       squares sum 44/16 L^2 -> var (ddof 1) = 11/12 L^2 -> stderr = L sqrt(11/12) / 2 = L sqrt(11/48).
    """
    lp, lr = _categorical_logps([0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0, 0, 1, 2])
    out = kl_estimates(lp, lr)
    assert out["k1"] == pytest.approx(math.log(2) / 4, abs=TOL)
    assert out["k3"] == pytest.approx(math.log(2) / 4, abs=TOL)
    assert out["k1_stderr"] == pytest.approx(math.log(2) * math.sqrt(11 / 48), abs=TOL)
    assert out["n"] == 4


def test_kl_of_a_distribution_with_itself_is_zero() -> None:
    """q = p: log r = 0 for every sample -> k1 = k3 = 0, stderr 0."""
    p = [0.5, 0.25, 0.25]
    lp, lr = _categorical_logps(p, p, [0, 0, 1, 2])
    assert kl_estimates(lp, lr) == {"k1": 0.0, "k3": 0.0, "k1_stderr": 0.0, "n": 4}


def test_kl_single_sample_and_errors() -> None:
    """One sample lp = -1, lr = -2: log r = -1, k1 = 1, k3 = e^-1 - 1 + 1 = e^-1, stderr 0 (n < 2).

    A huge log r gives k3 = inf instead of an OverflowError.
    """
    out = kl_estimates([-1.0], [-2.0])
    assert out["k1"] == pytest.approx(1.0, abs=TOL)
    assert out["k3"] == pytest.approx(math.exp(-1), abs=TOL)
    assert out["k1_stderr"] == 0.0
    assert kl_estimates([-1000.0], [0.0])["k3"] == math.inf
    with pytest.raises(ValueError, match="3 items.*2 items"):
        kl_estimates([0.0, 0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="at least one"):
        kl_estimates([], [])


# ---------------------------------------------------------------- win rate


def test_win_rate_counts() -> None:
    """policy [3, 1, 2, 2, 0.5] vs reference [1, 2, 2, 1, 0.5]: win, loss, tie, win, tie.

    w = 2, t = 2, l = 1, n = 5 -> win_rate = (2 + 1)/5 = 0.6; fractions 0.4, 0.4, 0.2.
    """
    out = win_rate([3, 1, 2, 2, 0.5], [1, 2, 2, 1, 0.5])
    assert out == pytest.approx({"win_rate": 0.6, "wins": 0.4, "ties": 0.4, "losses": 0.2, "n": 5}, abs=TOL)


def test_win_rate_tie_tolerance() -> None:
    """policy [1, 1.25, 2] vs reference [1.5, 1, 1] (exact binary fractions): diffs -0.5, 0.25, 1.

    tol 0.25: loss, tie (|0.25| <= 0.25), win -> win_rate (1 + 0.5)/3 = 0.5.
    tol 0:    loss, win, win            -> win_rate 2/3.
    """
    policy, reference = [1.0, 1.25, 2.0], [1.5, 1.0, 1.0]
    out = win_rate(policy, reference, tie_tolerance=0.25)
    assert out == pytest.approx({"win_rate": 0.5, "wins": 1 / 3, "ties": 1 / 3, "losses": 1 / 3, "n": 3}, abs=TOL)
    assert win_rate(policy, reference)["win_rate"] == pytest.approx(2 / 3, abs=TOL)


def test_win_rate_errors() -> None:
    with pytest.raises(ValueError, match="3 items.*2 items"):
        win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least one"):
        win_rate([], [])
    with pytest.raises(ValueError, match="tie_tolerance"):
        win_rate([1], [1], tie_tolerance=-0.1)


# ---------------------------------------------------------------- lengths and histograms


def test_length_stats_even_and_odd() -> None:
    """[5,1,9,3,7,2,8,4,6,10] (1..10): mean 5.5, median (5+6)/2 = 5.5, p90 rank ceil(9) = 9 -> 9, min 1, max 10.

    [3,1,2]: mean 2, median 2, p90 rank ceil(2.7) = 3 -> 3.
    1..20: p90 rank ceil(18) = 18 -> 18 (not 19: the rank of an exact multiple is not rounded up).
    """
    assert length_stats([5, 1, 9, 3, 7, 2, 8, 4, 6, 10]) == {
        "mean": 5.5, "median": 5.5, "p90": 9.0, "min": 1.0, "max": 10.0, "n": 10}
    assert length_stats([3, 1, 2]) == {"mean": 2.0, "median": 2.0, "p90": 3.0, "min": 1.0, "max": 3.0, "n": 3}
    assert length_stats(list(range(1, 21)))["p90"] == 18.0
    with pytest.raises(ValueError):
        length_stats([])


def test_length_ratio() -> None:
    """mean([2,4,6]) / mean([2,2]) = 4 / 2 = 2."""
    assert length_ratio([2, 4, 6], [2, 2]) == pytest.approx(2.0, abs=TOL)
    with pytest.raises(ValueError):
        length_ratio([], [1])
    with pytest.raises(ValueError, match="all zero"):
        length_ratio([1], [0, 0])


def test_histogram_half_open_bins_last_closed() -> None:
    """edges [0,1,2]: [0,1) gets 0, 0.5; [1,2] gets 1, 1.5, 2, 2; -1 and 3 fall outside."""
    assert histogram([0, 0.5, 1, 1.5, 2, 2, -1, 3], [0, 1, 2]) == [2, 4]
    with pytest.raises(ValueError, match="strictly increasing"):
        histogram([1], [0, 0, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        histogram([1], [0])


def test_shared_edges_integer_width() -> None:
    """[3,10,7] and [5,12], bins 5: lo = 3, K = 12 - 3 + 1 = 10 integers, w = 2, m = 5 -> 3,5,7,9,11,13.

    Counts: [3,10,7] -> [3,5): 3, [7,9): 7, [9,11): 10 -> [1,0,1,1,0]; [5,12] -> [0,1,0,0,1].
    bins 3: w = ceil(10/3) = 4, m = ceil(10/4) = 3 -> 3,7,11,15.
    0..10 with bins 20: K = 11, w = 1 -> edges 0..11, one integer per bin (10 not merged with 9).
    """
    edges = shared_edges([3, 10, 7], [5, 12], bins=5)
    assert edges == [3.0, 5.0, 7.0, 9.0, 11.0, 13.0]
    assert histogram([3, 10, 7], edges) == [1, 0, 1, 1, 0]
    assert histogram([5, 12], edges) == [0, 1, 0, 0, 1]
    assert shared_edges([3, 10, 7], [5, 12], bins=3) == [3.0, 7.0, 11.0, 15.0]
    lengths = list(range(11))
    edges = shared_edges(lengths, bins=20)
    assert edges == [float(i) for i in range(12)]
    assert histogram(lengths, edges) == [1] * 11
    assert shared_edges([5, 5]) == [5.0, 6.0]
    with pytest.raises(ValueError):
        shared_edges([], [])
    with pytest.raises(ValueError):
        shared_edges([1], bins=0)


# ---------------------------------------------------------------- energy


def test_energy_change_rows() -> None:
    """reference a=4, b=2, c=0; policy a=5, b=1, c=3 -> changes 1, -1, 3; relative 1/4, -1/2, 0 (ref 0)."""
    rows = energy_change({"b": 2.0, "a": 4.0, "c": 0.0}, {"a": 5.0, "b": 1.0, "c": 3.0})
    assert rows == [
        {"layer": "a", "reference": 4.0, "policy": 5.0, "change": 1.0, "relative_change": 0.25},
        {"layer": "b", "reference": 2.0, "policy": 1.0, "change": -1.0, "relative_change": -0.5},
        {"layer": "c", "reference": 0.0, "policy": 3.0, "change": 3.0, "relative_change": 0.0},
    ]
    with pytest.raises(ValueError, match=r"only in reference \['b'\], only in policy \['c'\]"):
        energy_change({"a": 1.0, "b": 1.0}, {"a": 1.0, "c": 1.0})


def test_hyperspherical_energy_three_vectors_at_120_degrees() -> None:
    """Unit directions at 0, 120, 240 degrees: every chord is 2 sin(60) = sqrt(3); 6 ordered pairs.

    HE = 6 / sqrt(3) = 2 sqrt(3) = 3.4641016151. Rows scaled by 1, 3, 0.5: normalisation gives the same.
    """
    s = math.sqrt(3) / 2
    w = torch.tensor([[1.0, 0.0], [-0.5, s], [-0.5, -s]]) * torch.tensor([[1.0], [3.0], [0.5]])
    assert hyperspherical_energy(w) == pytest.approx(2 * math.sqrt(3), rel=1e-6)
    assert hyperspherical_energy(w, chunk=1) == pytest.approx(2 * math.sqrt(3), rel=1e-6)


def test_hyperspherical_energy_square() -> None:
    """Directions +x, +y, -x, -y (rows of norms 2, 0.5, 7, 1).

    Adjacent (90 deg) chords sqrt(2): 4 unordered pairs = 8 ordered; opposite (180 deg) chords 2: 2 unordered
    = 4 ordered. HE = 8/sqrt(2) + 4/2 = 4 sqrt(2) + 2 = 7.6568542495. Chunks of 1 and 3 give the same.
    """
    w = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-7.0, 0.0], [0.0, -1.0]])
    expected = 4 * math.sqrt(2) + 2
    for chunk in (1024, 1, 3):
        assert hyperspherical_energy(w, chunk=chunk) == pytest.approx(expected, rel=1e-6)


def test_mean_or_none() -> None:
    """[1,2,4] -> 7/3; empty (also an empty generator) -> None."""
    assert mean_or_none([1, 2, 4]) == pytest.approx(7 / 3, abs=TOL)
    assert mean_or_none([]) is None
    assert mean_or_none(x for x in []) is None
