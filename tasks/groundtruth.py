"""Ground truth for attribution: the linear datamodeling score (LDS) and counterfactual removal.

An attribution method gives a score ``tau[q, i]`` for every query ``q`` and training
sample ``i``; positive means "sample i helped the model on query q" (training on it
lowered the query's loss), the sign convention of Kronfluence and TRAK.  Retraining
tells what really happened:

- **LDS** (Park et al., 2023, "TRAK"; Bae et al., 2024, Kronfluence): draw M random
  subsets S_m of the training set, each of ``round(fraction * n)`` samples, and retrain
  on each.  The method predicts the group effect ``g[q, m] = sum_{i in S_m} tau[q, i]``;
  the truth is the retrained model's loss on q.  LDS for q is the Spearman correlation
  over the M subsets between ``g[q, m]`` and ``-loss[m, q]`` (more helpful samples
  kept, lower loss); a method's LDS is the mean over queries, with a 95% interval
  from the spread over queries (mean +- 1.96 standard errors).  Random scores give 0 in
  expectation.
- **Counterfactual removal**: for a query, drop the k training samples the method
  ranks most helpful, retrain, and measure the query loss increase over the model
  trained on everything; compare with dropping k random samples.  A method that knows
  what the model learned from makes the loss rise more than random removal does.

Every draw is a function of a recorded seed, so a subset is named by (seed, index) and
its retraining can be redone or skipped exactly.
"""

from __future__ import annotations

import math

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


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> dict:
    """LDS of scores (Q, n) against retrained losses (M, Q) on subsets masks (M, n): per query, mean, 95% interval."""
    scores, masks, losses = np.asarray(scores, np.float64), np.asarray(masks, bool), np.asarray(losses, np.float64)
    if scores.shape[1] != masks.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise GroundTruthError(f"shapes do not fit: scores {scores.shape} (queries, train), masks {masks.shape} "
                               f"(subsets, train), losses {losses.shape} (subsets, queries)")
    predicted = scores @ masks.T.astype(np.float64)             # (Q, M): summed scores of each subset's members
    per_query = spearman_rows(predicted, -losses.T)
    valid = per_query[~np.isnan(per_query)]
    mean = float(valid.mean()) if len(valid) else float("nan")
    half = float(1.96 * valid.std(ddof=1) / math.sqrt(len(valid))) if len(valid) > 1 else float("nan")
    return {"per_query": per_query, "lds": mean, "ci_low": mean - half, "ci_high": mean + half, "n_queries": int(len(valid))}


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
