"""LDS and counterfactual removal math against direct computation (scipy's Spearman, explicit loops)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from gradlake.tasks.attribution.lds import (GroundTruthError, check_subsets, compare, crossed_interval, draw_subsets, lds,
    lds_beyond_source, random_removals, source_oracle, spearman_rows, subset_bootstrap, top_k_removals)


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
    assert got["ci_low"] < got["lds"] < got["ci_high"]
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


def test_subset_bootstrap_against_a_loop_over_resamples():
    rng = np.random.default_rng(2)
    predicted, losses = rng.normal(size=(4, 12)), rng.normal(size=(12, 4))
    boot = subset_bootstrap(predicted, losses, n_boot=5, seed=9)
    columns = np.random.default_rng([9, 7919]).integers(0, 12, size=(5, 12))
    for b, c in enumerate(columns):
        for q in range(4):
            expected = spearmanr(predicted[q, c], -losses[c, q]).statistic
            assert boot[b, q] == pytest.approx(expected, abs=1e-12) or (np.isnan(expected) and np.isnan(boot[b, q]))


def _crossed_experiment(seed: int, n: int = 40, m: int = 20, q: int = 16):
    """One synthetic benchmark: true effects with a part common to every query (so queries' LDS co-vary through the
    shared subsets), a noisy method, retraining noise per query and per subset."""
    gamma = np.random.default_rng(0).normal(size=n)          # the training set: fixed across experiments
    rng = np.random.default_rng(seed)
    beta = gamma + rng.normal(size=(q, n))
    scores = beta + 1.5 * rng.normal(size=(q, n))
    masks = np.zeros((m, n), bool)
    for row in masks:
        row[rng.choice(n, n // 2, replace=False)] = True
    losses = -(masks.astype(float) @ beta.T) + 3.0 * rng.normal(size=(m, q)) + 3.0 * rng.normal(size=(m, 1))
    return scores, masks, losses


def test_intervals_cover_a_known_lds_at_their_nominal_rate():
    """The estimand is the expected LDS of this method at this design (M subsets, Q queries), fixed by simulating many
    experiments; the interval of each of 300 fresh experiments should hold it about 95% of the time.  The interval over
    queries alone (the formula used before) misses the variation the shared subsets add and under-covers."""
    truth = np.mean([lds(*_crossed_experiment(10 ** 6 + s), n_boot=0)["lds"] for s in range(2000)])
    hits, hits_queries_only, runs = 0, 0, 300
    for seed in range(runs):
        result = lds(*_crossed_experiment(seed), n_boot=200, seed=seed)
        hits += result["ci_low"] <= truth <= result["ci_high"]
        values = result["per_query"]
        half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
        hits_queries_only += values.mean() - half <= truth <= values.mean() + half
    coverage, naive = hits / runs, hits_queries_only / runs
    print(f"true LDS {truth:.3f}: coverage {coverage:.3f}, queries-only interval {naive:.3f}")
    assert 0.9 <= coverage <= 0.99, coverage
    assert naive < coverage - 0.04, (naive, coverage)


def test_paired_comparison_separates_only_what_differs():
    scores, masks, losses = _crossed_experiment(5, q=32, m=30)
    rng = np.random.default_rng(3)
    good = lds(scores, masks, losses, seed=1)
    worse = lds(scores + 6 * rng.normal(size=scores.shape), masks, losses, seed=1)
    same = lds(scores + 1e-9 * rng.normal(size=scores.shape), masks, losses, seed=1)
    diff, low, high = compare(good, worse)
    assert diff > 0 and low > 0, (diff, low, high)
    diff, low, high = compare(good, same)
    assert low <= 0 <= high
    # The interval of a difference is the crossed interval of the per-query differences, not two intervals compared.
    assert (low, high) == crossed_interval(good["per_query"] - same["per_query"], good["boot"] - same["boot"])


def test_the_source_oracle_and_lds_beyond_the_source():
    """Queries made from one training sample (a duplicate whose presence dominates the loss): the oracle's LDS is near 1,
    its LDS beyond the source near 0; a method that also knows the other samples' small effects keeps a positive LDS
    beyond the source.  Held-out queries (no source): the oracle is a random score."""
    rng = np.random.default_rng(4)
    n, m, q = 40, 40, 24
    masks = draw_subsets(n, 0.5, m, seed=0)
    sources = list(rng.choice(n, q, replace=False))
    effects = 0.3 * rng.normal(size=(q, n))
    effects[np.arange(q), sources] = 8.0
    losses = -(masks.astype(float) @ effects.T) + 0.5 * rng.normal(size=(m, q))
    oracle = source_oracle([int(s) for s in sources], n, seed=0)
    assert lds(oracle, masks, losses)["lds"] > 0.7
    beyond, beyond_boot = lds_beyond_source(oracle, masks, losses, [int(s) for s in sources], n_boot=200)
    assert abs(np.nanmean(beyond)) < 0.15
    low, high = crossed_interval(beyond, beyond_boot)
    assert low < 0 < high  # the oracle knows nothing beyond the source
    # the resamples, written out: the same subset resamples as the LDS's, strata taken within each
    columns = np.random.default_rng([0, 7919]).integers(0, m, size=(200, m))
    for b in (0, 7, 199):
        for j in (0, 5):
            c, s = columns[b], int(sources[j])
            predicted, target = (oracle[j] @ masks.T.astype(float))[c], -losses[c, j]
            parts = [(spearmanr(predicted[k], target[k]).statistic, k.sum()) for k in (masks[c, s], ~masks[c, s])
                     if k.sum() >= 3]
            parts = [(r, w) for r, w in parts if not np.isnan(r)]
            expected = sum(r * w for r, w in parts) / sum(w for _, w in parts) if parts else np.nan
            assert beyond_boot[b, j] == pytest.approx(expected, abs=1e-9, nan_ok=True)
    knows_more = lds_beyond_source(effects, masks, losses, [int(s) for s in sources])[0]
    assert np.nanmean(knows_more) > 0.4
    # Within-stratum correlations, written out for one query.
    j, s = 0, int(sources[0])
    predicted = effects[j] @ masks.T.astype(float)
    parts = [(spearmanr(predicted[k], -losses[k, j]).statistic, k.sum()) for k in (masks[:, s], ~masks[:, s])]
    assert knows_more[0] == pytest.approx(sum(r * w for r, w in parts) / sum(w for _, w in parts))
    # Held out: no source, the oracle has no information.
    held_out_effects = 0.3 * rng.normal(size=(200, n))
    held_losses = -(masks.astype(float) @ held_out_effects.T) + 0.5 * rng.normal(size=(m, 200))
    blind = lds(source_oracle([None] * 200, n, seed=0), masks, held_losses)
    assert abs(blind["lds"]) < 0.06
    assert np.array_equal(lds_beyond_source(held_out_effects, masks, held_losses, [None] * 200)[0],
                          lds(held_out_effects, masks, held_losses, n_boot=0)["per_query"], equal_nan=True)


def test_the_best_tensor_is_never_chosen_on_the_queries_it_scores():
    """Cross-fitting: each fold's tensor is the best on the other folds; whatever a fold's own queries say, its choice
    does not move, and a tensor that is best only on a fold's own queries is never that fold's choice."""
    from gradlake.tasks.attribution.spec import AttributionError
    from gradlake.tasks.attribution.benchmark import cross_fitted_choice, query_folds

    fold = query_folds(10, 2, seed=0)
    assert sorted(np.bincount(fold)) == [5, 5] and np.array_equal(fold, query_folds(10, 2, seed=0))
    rng = np.random.default_rng(0)
    per_query = {f"t{i}": rng.uniform(-0.2, 0.2, size=10) for i in range(4)}
    per_query["t0"][fold == 0] = 0.9   # best on fold 0's own queries only
    per_query["t1"][fold == 1] = 0.9   # best on fold 1's own queries only
    chosen = cross_fitted_choice(per_query, fold)
    assert chosen == ["t1", "t0"]       # fold 0 is scored by what fold 1 found best, and the other way round
    for f in (0, 1):                    # a fold's own values never change its choice
        shuffled = {name: np.where(fold == f, rng.uniform(-1, 1, size=10), values) for name, values in per_query.items()}
        assert cross_fitted_choice(shuffled, fold)[f] == chosen[f]
    with pytest.raises(AttributionError, match="best_tensor_folds=5 with 4 queries leaves a fold with no query"):
        query_folds(4, 5, seed=0)
