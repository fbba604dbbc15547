"""LDS and counterfactual removal math against direct computation (scipy's Spearman, explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from gradlake.tasks.groundtruth import (GroundTruthError, check_subsets, draw_subsets, lds, random_removals,
                                        spearman_rows, top_k_removals)


def test_spearman_rows_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(6, 30)).astype(float)  # many ties
    b = rng.normal(size=(6, 30))
    ours = spearman_rows(a, b)
    for row in range(6):
        assert ours[row] == pytest.approx(spearmanr(a[row], b[row]).statistic, abs=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), b[:1, :5]))[0]


def test_subsets_are_seeded_sized_and_distinct():
    masks = draw_subsets(20, 0.5, 8, seed=3)
    assert masks.shape == (8, 20) and (masks.sum(axis=1) == 10).all()
    assert len({m.tobytes() for m in masks}) == 8
    assert np.array_equal(masks, draw_subsets(20, 0.5, 8, seed=3))
    assert not np.array_equal(masks, draw_subsets(20, 0.5, 8, seed=4))
    # Subset m does not depend on how many are drawn: more subsets extend, never reshuffle.
    assert np.array_equal(draw_subsets(20, 0.5, 12, seed=3)[:8], masks)


@pytest.mark.parametrize("n, fraction, m, message", [
    (20, 0.0, 4, "fraction 0.0 is outside \\(0, 1\\)"),
    (20, 1.0, 4, "fraction 1.0 is outside \\(0, 1\\)"),
    (3, 0.1, 4, "keeps 0; a subset must keep between 1 and 2"),
    (4, 0.5, 7, "7 subsets of 2 out of 4 training samples cannot all differ \\(only 6 distinct"),
    (20, 0.5, 1, "1 subsets give no correlation"),
])
def test_bad_subset_settings(n, fraction, m, message):
    with pytest.raises(GroundTruthError, match=message):
        check_subsets(n, fraction, m)


def test_lds_against_a_direct_computation_and_known_cases():
    rng = np.random.default_rng(1)
    n, q, m = 30, 5, 40
    masks = draw_subsets(n, 0.5, m, seed=0)
    truth = rng.normal(size=(q, n))                       # each sample's true effect on each query
    losses = 3.0 - masks.astype(float) @ truth.T          # (M, Q): exactly linear, helpful samples lower the loss
    exact = lds(truth, masks, losses)
    assert exact["lds"] == pytest.approx(1.0)
    # Direct: loop over queries, sum scores of members, scipy's Spearman with the negated loss.
    noisy = truth + rng.normal(scale=2.0, size=truth.shape)
    got = lds(noisy, masks, losses)
    direct = [spearmanr([noisy[j][masks[s]].sum() for s in range(m)], -losses[:, j]).statistic for j in range(q)]
    assert got["per_query"] == pytest.approx(direct)
    assert got["lds"] == pytest.approx(np.mean(direct))
    half = 1.96 * np.std(direct, ddof=1) / math.sqrt(q)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((np.mean(direct) - half, np.mean(direct) + half))
    # Random scores: near 0 on average over many queries.
    many = rng.normal(size=(200, n))
    losses_many = 3.0 - masks.astype(float) @ rng.normal(size=(200, n)).T
    assert abs(lds(many, masks, losses_many)["lds"]) < 0.05
    # Reversed sign: -1.
    assert lds(-truth, masks, losses)["lds"] == pytest.approx(-1.0)


def test_removals():
    scores = np.array([[0.1, 0.9, 0.5, -1.0], [3.0, 2.0, 1.0, 0.0]])
    assert top_k_removals(scores, 2).tolist() == [[1, 2], [0, 1]]
    draws = random_removals(10, 3, draws=4, seed=0)
    assert draws.shape == (4, 3) and all(len(set(d)) == 3 for d in draws.tolist())
    assert np.array_equal(draws, random_removals(10, 3, draws=4, seed=0))
    with pytest.raises(GroundTruthError, match="k=4 samples to remove out of 4"):
        top_k_removals(scores, 4)
