"""Exact tests for comparing recipes over seeds (``tools/sample_benchmark.py --compare``).

Training on a small sample is chaotic: two recipes differ seed by seed by more than their means
do. The runs of two recipes with the same seed on the same protocol share their chips, folds and
initial weights, so they are compared in pairs (Wilcoxon's signed-rank test on the differences);
whether a run draws a class at all (its IoU above the LR labels') is compared as counts (Fisher's
exact test). Both are exact: a few tens of runs are far too few for the normal approximations.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

#: Relative tolerance when comparing the probabilities of tables (Fisher; the rank sums are exact integers).
_TOLERANCE = 1e-9


def signed_rank_p_greater(differences: Sequence[float]) -> float:
    """One-sided p-value of Wilcoxon's signed-rank test that the differences lean above 0.

    Zero differences are dropped (Wilcoxon's rule); tied absolute differences get their average rank.
    The p-value is the share of the ``2 ** n`` sign patterns whose positive rank sum is at least the
    observed one, counted exactly (ranks doubled so that half ranks stay integers). 1.0 when no
    difference is left.
    """
    values = [float(d) for d in differences if d != 0]
    if not values:
        return 1.0
    order = sorted(range(len(values)), key=lambda i: abs(values[i]))
    doubled = [0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and abs(values[order[end + 1]]) == abs(values[order[start]]):
            end += 1
        for k in range(start, end + 1):
            doubled[order[k]] = start + end + 2  # twice the average of ranks start + 1 .. end + 1
        start = end + 1
    observed = sum(rank for rank, value in zip(doubled, values) if value > 0)
    counts = {0: 1}  # positive rank sum -> number of sign patterns
    for rank in doubled:
        grown = dict(counts)
        for total, ways in counts.items():
            grown[total + rank] = grown.get(total + rank, 0) + ways
        counts = grown
    return sum(ways for total, ways in counts.items() if total >= observed) / 2 ** len(values)


def fisher_exact_p(hits_a: int, runs_a: int, hits_b: int, runs_b: int) -> float:
    """Two-sided p-value of Fisher's exact test that ``hits_a`` of ``runs_a`` and ``hits_b`` of ``runs_b``
    come from one rate: the probability, given the margins, of every table no more likely than this one."""
    if not (0 <= hits_a <= runs_a and 0 <= hits_b <= runs_b):
        raise ValueError(f"hits must lie in 0..runs: {hits_a}/{runs_a}, {hits_b}/{runs_b}")
    hits, runs = hits_a + hits_b, runs_a + runs_b

    def probability(a: int) -> float:
        return comb(runs_a, a) * comb(runs_b, hits - a) / comb(runs, hits)

    observed = probability(hits_a)
    tables = range(max(0, hits - runs_b), min(runs_a, hits) + 1)
    return min(1.0, sum(p for p in map(probability, tables) if p <= observed * (1 + _TOLERANCE)))
