"""Exact paired and count tests of tools/sample_benchmark.py --compare, against values worked by hand."""

from __future__ import annotations

import pytest

from scoring.significance import fisher_exact_p, signed_rank_p_greater


@pytest.mark.parametrize("differences, p", [
    ([0.01, 0.02, 0.03, 0.04, 0.05], 1 / 32),  # every sign positive: 1 pattern of 32
    ([-0.01, 0.02, 0.03, 0.04, 0.05], 2 / 32),  # rank sum 14: all positive (15) or all but rank 1 (14)
    ([0.1, -0.1, 0.2], 3 / 8),  # tied ranks 1.5, 1.5, 3: positive sum 4.5; sums >= 4.5 are 4.5, 4.5 and 6
    ([0.0, 0.01, 0.02], 1 / 4),  # the zero is dropped
    ([-0.01, -0.02, -0.03], 1.0),
    ([], 1.0),
    ([0.0], 1.0),
])
def test_signed_rank_p_greater_counts_the_sign_patterns_exactly(differences, p):
    assert signed_rank_p_greater(differences) == pytest.approx(p)


def test_signed_rank_p_weighs_each_difference_by_its_size():
    # four gains and two losses either way: the ranks, not the count of gains, decide
    small_losses = [0.05, 0.04, 0.03, 0.02, -0.01, -0.005]  # losses ranked 1, 2: negative sets summing to <= 3
    large_losses = [0.01, 0.005, 0.03, 0.02, -0.05, -0.04]  # losses ranked 5, 6: negative sets summing to <= 11
    assert signed_rank_p_greater(small_losses) == pytest.approx(5 / 64)
    assert signed_rank_p_greater(large_losses) == pytest.approx(37 / 64)


@pytest.mark.parametrize("counts, p", [
    ((3, 4, 1, 4), 34 / 70),  # the tea-tasting table: tables 3-1, 4-0 and their mirrors, (16 + 1 + 1 + 16) / 70
    ((2, 4, 2, 4), 1.0),
    ((4, 4, 0, 4), 2 / 70),  # only the two extreme tables
    ((18, 30, 8, 30), 0.018244),  # docs/map_quality.md: focal and focus, impervious above NLCD's
])
def test_fisher_exact_p_sums_the_tables_no_more_likely(counts, p):
    found = fisher_exact_p(*counts)
    assert found == pytest.approx(p, rel=1e-4)
    hits_a, runs_a, hits_b, runs_b = counts
    assert fisher_exact_p(hits_b, runs_b, hits_a, runs_a) == pytest.approx(found, rel=1e-12)  # symmetric


def test_fisher_exact_p_refuses_impossible_counts():
    with pytest.raises(ValueError, match="hits must lie in 0..runs"):
        fisher_exact_p(5, 4, 0, 4)
