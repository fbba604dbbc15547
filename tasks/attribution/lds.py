"""Ground truth for attribution: the linear datamodeling score (LDS) and counterfactual removal.

An attribution method gives a score ``tau[q, i]`` for every query ``q`` and training
sample ``i``; positive means "sample i helped the model on query q" (training on it
lowered the query's loss), the sign convention of Kronfluence and TRAK.  Retraining
tells what really happened:

- **LDS** (Park et al., 2023, "TRAK"; Bae et al., 2024, Kronfluence): draw M random
  subsets S_m of the training set, each of ``round(fraction * n)`` samples, and retrain
  on each (with R data-order seeds, losses averaged).  The method predicts the group
  effect ``g[q, m] = sum_{i in S_m} tau[q, i]``; the truth is the retrained model's loss
  on q.  LDS for q is the Spearman correlation over the M subsets between ``g[q, m]`` and
  ``-loss[m, q]`` (more helpful samples kept, lower loss); a method's LDS is the mean over
  queries.  Its 95% interval is a percentile bootstrap over subsets and queries jointly
  (both resampled in every draw, since every query shares the same subsets); two
  methods are told apart only when the paired bootstrap interval of their difference
  excludes 0.  Random scores give 0 in expectation.
- **The source oracle**: where a query was made from one training sample (a paraphrase
  of it, the model's answer to it), a score of 1 for that sample and random tie-breaking
  noise for the rest.  It measures how much of an LDS is explained by knowing the
  duplicate alone; on held-out queries it is a random score.
- **LDS beyond the source**: for a query with a source sample s, the Spearman correlation
  computed separately among the subsets that contain s and among those that lack it,
  averaged with weights by subset count.  Within each stratum the duplicate's effect is
  constant, so what remains is what a method knows beyond duplicate retrieval (the
  oracle's is 0 in expectation).  Stratifying is a rank statistic like LDS itself and
  assumes nothing about how the source's effect combines with the rest, which a partial
  correlation (regressing the indicator out) would.
- **Counterfactual removal**: for a query, drop the k training samples the method
  ranks most helpful, retrain, and measure the query loss increase over the model
  trained on everything; compare with dropping k random samples.  A method that knows
  what the model learned from makes the loss rise more than random removal does.

Every draw is a function of a recorded seed, so a subset is named by (seed, index) and
its retraining can be redone or skipped exactly.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd


class GroundTruthError(ValueError):
    """Settings that cannot give a ground truth, with what would be accepted."""


def subset_size(n_train: int, fraction: float) -> int:
    """Samples kept per subset: round(fraction * n), which must leave at least one in and one out."""
    if not 0.0 < fraction < 1.0:
        raise GroundTruthError(f"subset fraction {fraction} is outside (0, 1); use e.g. 0.5 (half of the training set)")
    size = round(fraction * n_train)
    if not 1 <= size <= n_train - 1:
        raise GroundTruthError(f"a fraction of {fraction} of {n_train} training samples keeps {size}; "
                               f"a subset must keep between 1 and {n_train - 1}: raise the fraction or the training set")
    return size


def check_subsets(n_train: int, fraction: float, n_subsets: int) -> int:
    """Validate (fraction, M) against the training set before any retraining; returns the subset size."""
    size = subset_size(n_train, fraction)
    if n_subsets < 2:
        raise GroundTruthError(f"{n_subsets} subsets give no correlation; use at least 2 (LDS studies use 50-100)")
    distinct = math.comb(n_train, size)
    if n_subsets > distinct:
        raise GroundTruthError(f"{n_subsets} subsets of {size} out of {n_train} training samples cannot all differ "
                               f"(only {distinct} distinct subsets exist); use at most {distinct} subsets or more samples")
    return size


def draw_subsets(n_train: int, fraction: float, n_subsets: int, seed: int) -> np.ndarray:
    """Membership masks (M, n): subset m is ``numpy.random.default_rng([seed, m])``'s choice of size samples."""
    size = check_subsets(n_train, fraction, n_subsets)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, np.random.default_rng([seed, m]).choice(n_train, size=size, replace=False)] = True
    return masks


def rank(values: np.ndarray) -> np.ndarray:
    """Average ranks along each row (ties share the mean of their ranks), as Spearman's rho uses."""
    return pd.DataFrame(np.atleast_2d(np.asarray(values, dtype=np.float64))).rank(axis=1, method="average").to_numpy(copy=True)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching rows of a and b (Q, M): the Pearson correlation of their ranks; NaN if constant."""
    ra, rb = rank(a), rank(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=1) / denominator, np.nan)


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """LDS of scores (Q, n) against retrained losses (M, Q) on subsets masks (M, n).

    Returns the per-query values, their mean, its 95% interval (`crossed_interval`) and the
    per-query values on the subset resamples (`boot`, (B, Q); the same `seed` gives every
    method the same resamples, so two methods' results can be compared with `compare`).
    """
    scores, masks, losses = np.asarray(scores, np.float64), np.asarray(masks, bool), np.asarray(losses, np.float64)
    if scores.shape[1] != masks.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise GroundTruthError(f"shapes do not fit: scores {scores.shape} (queries, train), masks {masks.shape} "
                               f"(subsets, train), losses {losses.shape} (subsets, queries)")
    predicted = scores @ masks.T.astype(np.float64)             # (Q, M): summed scores of each subset's members
    per_query = spearman_rows(predicted, -losses.T)
    per_query[~np.isfinite(scores).all(axis=1)] = np.nan       # never a correlation of ranks of NaN
    valid = per_query[~np.isnan(per_query)]
    mean = float(valid.mean()) if len(valid) else float("nan")
    boot = subset_bootstrap(predicted, losses, n_boot, seed)
    boot[:, np.isnan(per_query)] = np.nan
    low, high = crossed_interval(per_query, boot)
    return {"per_query": per_query, "lds": mean, "ci_low": low, "ci_high": high, "n_queries": int(len(valid)),
            "dropped": query_drops(scores, per_query, predicted, losses), "boot": boot}


def query_drops(scores: np.ndarray, per_query: np.ndarray, predicted: np.ndarray | None = None,
                losses: np.ndarray | None = None, otherwise: str = "an undefined correlation") -> dict[str, int]:
    """Why the queries whose value is NaN were left out of a metric's mean: {reason: number of queries}.

    `scores` (Q, n), `per_query` (Q,), `predicted` (Q, M) the summed scores per subset, `losses` (M, Q)."""
    dropped: dict[str, int] = {}
    for q in np.flatnonzero(np.isnan(np.asarray(per_query, np.float64))):
        if not np.isfinite(scores[q]).all():
            why = "non-finite scores"
        elif losses is not None and not np.isfinite(losses[:, q]).all():
            why = "non-finite retrained losses"
        elif losses is not None and np.ptp(losses[:, q]) == 0:
            why = "the same retrained loss on every subset"
        elif predicted is not None and np.ptp(predicted[q]) == 0:
            why = "the same summed score on every subset (constant scores)"
        else:
            why = otherwise
        dropped[why] = dropped.get(why, 0) + 1
    return dropped


def dropped_text(dropped: dict[str, int]) -> str | None:
    """`query_drops` in words ("non-finite scores for 3 queries; ..."), None when every query was used."""
    if not dropped:
        return None
    return "; ".join(f"{why} for {n} quer{'y' if n == 1 else 'ies'}" for why, n in sorted(dropped.items()))


def top_k_removals(scores: np.ndarray, k: int) -> np.ndarray:
    """Indexes (Q, k) of each query's k most helpful training samples (highest score first)."""
    if not 1 <= k < scores.shape[1]:
        raise GroundTruthError(f"k={k} samples to remove out of {scores.shape[1]}; use 1 <= k < {scores.shape[1]}")
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]


def random_removals(n_train: int, k: int, draws: int, seed: int) -> np.ndarray:
    """Indexes (draws, k) of random removals: draw d is ``default_rng([seed, d])``'s choice."""
    if not 1 <= k < n_train:
        raise GroundTruthError(f"k={k} samples to remove out of {n_train}; use 1 <= k < {n_train}")
    return np.stack([np.random.default_rng([seed, d]).choice(n_train, size=k, replace=False) for d in range(draws)])


# ---------------------------------------------------------------- intervals and references

def _rank_last(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis of any array (ties share their mean rank)."""
    from scipy.stats import rankdata

    return rankdata(values, axis=-1, method="average")


def _spearman_last(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis of equally shaped arrays; NaN where either side is constant."""
    ra, rb = _rank_last(a), _rank_last(b)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((ra ** 2).sum(axis=-1) * (rb ** 2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=-1) / np.where(denominator > 0, denominator, 1), np.nan)


def subset_bootstrap(predicted: np.ndarray, losses: np.ndarray, n_boot: int, seed: int, chunk: int = 64) -> np.ndarray:
    """Per-query LDS on `n_boot` resamples of the subsets: (B, Q), from predicted group effects (Q, M) and losses (M, Q).

    Draw b resamples the M subsets with replacement (``default_rng([seed, 7919])``, so every
    method sees the same resamples and differences between methods are paired).
    """
    predicted = np.asarray(predicted, np.float64)
    target = -np.asarray(losses, np.float64).T
    columns = _resampled_columns(predicted.shape[1], n_boot, seed)
    out = np.empty((n_boot, predicted.shape[0]))
    for start in range(0, n_boot, chunk):
        c = columns[start:start + chunk]
        out[start:start + chunk] = _spearman_last(predicted[:, c].transpose(1, 0, 2), target[:, c].transpose(1, 0, 2))
    return out


def crossed_interval(per_query: np.ndarray, boot: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Interval for a mean over queries that all share one set of subsets (a crossed design).

    The mean's variance is the between-query part ``s_q^2 / Q`` plus the part common to every
    query that the finite set of subsets adds, ``var_c``.  With ``V_sub`` the variance of the
    query mean over subset resamples and ``W`` the mean per-query variance over them,
    ``V_sub = var_c + var_e / Q`` and ``W = var_c + var_e``, so
    ``var_c = (Q V_sub - W) / (Q - 1)``.  A t interval with Q - 1 degrees of freedom.

    Measured on synthetic scores with a known LDS (``tests/test_groundtruth.py``): covers at
    about its nominal rate, where an interval over queries alone under-covers (it ignores
    the shared subsets) and a bootstrap resampling queries and subsets together
    over-covers (it counts the query-by-subset noise twice).
    """
    from scipy.stats import t

    per_query, boot = np.asarray(per_query, np.float64), np.asarray(boot, np.float64)
    keep = ~np.isnan(per_query)
    values, boot = per_query[keep], boot[:, keep]
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v_sub = np.nanvar(np.nanmean(boot, axis=1), ddof=1) if len(boot) > 1 else 0.0
        w = np.nanmean(np.nanvar(boot, axis=0, ddof=1)) if len(boot) > 1 else 0.0
    var_c = max(0.0, (n * np.nan_to_num(v_sub) - np.nan_to_num(w)) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1) * np.sqrt(values.var(ddof=1) / n + var_c))
    mean = float(values.mean())
    return mean - half, mean + half


def source_oracle(query_sources: list[int | None], n_train: int, seed: int) -> np.ndarray:
    """Scores (Q, n): 1 for each query's source training sample (if it has one), tiny seeded noise elsewhere.

    The noise only breaks ties so that the correlation is defined; it carries no information.
    """
    rng = np.random.default_rng([seed, 104729])
    scores = rng.normal(scale=1e-6, size=(len(query_sources), n_train))
    for q, source in enumerate(query_sources):
        if source is not None:
            scores[q, source] = 1.0
    return scores


def _resampled_columns(n_subsets: int, n_boot: int, seed: int) -> np.ndarray:
    """The subset resamples every bootstrap here draws: (B, M), ``default_rng([seed, 7919])``."""
    return np.random.default_rng([seed, 7919]).integers(0, n_subsets, size=(n_boot, n_subsets))


def _masked_spearman(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis over the entries where `keep` is true (NaN where fewer than 3 or constant)."""
    ra = _rank_last(np.where(keep, a, np.inf))  # the kept entries rank among themselves, the rest above them
    rb = _rank_last(np.where(keep, b, np.inf))
    n = keep.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        ra = np.where(keep, ra - (n + 1) / 2, 0.0)
        rb = np.where(keep, rb - (n + 1) / 2, 0.0)
        denominator = np.sqrt((ra ** 2).sum(axis=-1) * (rb ** 2).sum(axis=-1))
        rho = (ra * rb).sum(axis=-1) / np.where(denominator > 0, denominator, 1)
    return np.where((denominator > 0) & (n[..., 0] >= 3), rho, np.nan)


def lds_beyond_source(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray,
                      query_sources: list[int | None], n_boot: int = 0, seed: int = 0,
                      min_stratum: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-query LDS with the source sample's effect held fixed (Q,), and the same on subset resamples (B, Q).

    For a query without a source it is the ordinary LDS; for one with a source, the
    subset-count-weighted mean of the Spearman correlations within the subsets that contain
    it and within those that lack it (a stratum of fewer than `min_stratum` subsets is left
    out; NaN if both are).  The resamples are those of `subset_bootstrap` with the same seed,
    so `crossed_interval` gives its interval.
    """
    scores, masks, losses = np.asarray(scores, np.float64), np.asarray(masks, bool), np.asarray(losses, np.float64)
    predicted = scores @ masks.T.astype(np.float64)
    target = -losses.T
    columns = np.concatenate([np.arange(len(masks))[None, :], _resampled_columns(len(masks), n_boot, seed)])
    out = np.empty((len(columns), len(scores)))
    for q, source in enumerate(query_sources):
        a, b = predicted[q][columns], target[q][columns]                       # (1 + B, M)
        if source is None:
            out[:, q] = _spearman_last(a, b)
            continue
        total, weight = np.zeros(len(columns)), np.zeros(len(columns))
        for inside in (True, False):
            keep = masks[columns, source] == inside
            count = keep.sum(axis=1)
            rho = _masked_spearman(a, b, keep)
            use = (count >= min_stratum) & ~np.isnan(rho)
            total += np.where(use, rho * count, 0.0)
            weight += np.where(use, count, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, q] = np.where(weight > 0, total / np.where(weight > 0, weight, 1), np.nan)
    return out[0], out[1:]


def compare(a: dict, b: dict) -> tuple[float, float, float]:
    """(mean difference, interval low, high) of two methods' LDS results from `lds` on the same subsets and seed."""
    diff = np.asarray(a["per_query"]) - np.asarray(b["per_query"])
    low, high = crossed_interval(diff, np.asarray(a["boot"]) - np.asarray(b["boot"]))
    return float(np.nanmean(diff)), low, high
