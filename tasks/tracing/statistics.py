"""Is a candidate derived from a base? Weight and embedding similarity after alignment, with permutation p-values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gradlake.tasks.tracing.permutation import (Permutation, align_hidden, assignment, check_comparable, decoder_layers,
                                                permutation_axes, permuted, random_permutation, unit_rows)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


@torch.no_grad()
def weight_cosines(base: nn.Module, candidate: nn.Module, permutation: Permutation | None = None) -> dict[str, float]:
    """Cosine similarity of each weight tensor of the base with the candidate's (permuted first, if given)."""
    axes = permutation_axes(candidate)
    cand = dict(candidate.named_parameters())
    out = {}
    for name, p in base.named_parameters():
        c = cand[name]
        if permutation is not None and name in axes:
            c = permuted(c, axes[name], permutation)
        out[name] = _cosine(p, c)
    return out


@torch.no_grad()
def embedding_cosine(base: nn.Module, candidate: nn.Module, permutation: Permutation | None = None) -> float:
    """Mean over tokens of the cosine of a token's input embedding in the base and in the candidate.

    Tokens whose embedding is zero in either model (a padding row) have no direction and are left out."""
    e_base = base.get_input_embeddings().weight
    e_cand = candidate.get_input_embeddings().weight
    if permutation is not None and permutation.hidden is not None:
        e_cand = e_cand.index_select(1, permutation.hidden.to(e_cand.device))
    kept = (e_base.norm(dim=1) > 0) & (e_cand.norm(dim=1) > 0)
    return float((unit_rows(e_base[kept]) * unit_rows(e_cand[kept])).sum(dim=1).mean())


def permutation_p_value(observed: float, null: Sequence[float], larger_is_related: bool = True) -> float:
    """(1 + #{null at least as related as observed}) / (1 + n)."""
    null = np.asarray(null, dtype=float)
    hits = (null >= observed).sum() if larger_is_related else (null <= observed).sum()
    return float((1 + hits) / (1 + len(null)))


def smallest_p_value(permutations: int, layers: int | None = None) -> float:
    """The smallest p-value a test can give: a permutation test's 1 / (1 + permutations), or, with `layers`, the
    matching test's: Fisher's combination of that many layers each at its smallest."""
    from scipy.stats import chi2

    smallest = permutation_p_value(1.0, [0.0] * permutations)
    if layers is None:
        return smallest
    return float(chi2.sf(-2 * sum(math.log(smallest) for _ in range(layers)), 2 * layers))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two permutations of 0..n-1 (their values are their ranks)."""
    a, b = a.astype(float) - a.mean(), b.astype(float) - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


@torch.no_grad()
def matching_test(base: nn.Module, candidate: nn.Module, permutations: int, seed: int = 0) -> dict:
    """Do the gate and up projections of each MLP align the candidate's units to the base's in the same way?

    Per layer: the Hungarian matchings from the gate rows alone and from the up rows alone (the
    residual dimensions aligned by the embeddings first), their Spearman correlation, and its
    permutation p-value (the up matching shuffled `permutations` times); the layers' p-values
    are combined with Fisher's method.  Returns ``{"rho": [...], "p_layers": [...], "p_value": p}``.
    """
    from scipy.stats import chi2

    check_comparable(base, candidate)
    hidden = align_hidden(base, candidate)
    generator = np.random.default_rng(seed)
    rhos, ps = [], []
    for lb, lc in zip(decoder_layers(base), decoder_layers(candidate)):
        matched = []
        for name in ("gate_proj", "up_proj"):
            w_b = getattr(lb.mlp, name).weight
            w_c = getattr(lc.mlp, name).weight.index_select(1, hidden.to(w_b.device))
            matched.append(assignment(unit_rows(w_b) @ unit_rows(w_c).T).numpy())
        rho = _spearman(*matched)
        null = [_spearman(matched[0], generator.permutation(matched[1])) for _ in range(permutations)]
        rhos.append(rho)
        ps.append(permutation_p_value(rho, null))
    statistic = -2 * sum(math.log(p) for p in ps)
    return {"rho": rhos, "p_layers": ps, "p_value": float(chi2.sf(statistic, 2 * len(ps)))}


def mean_weight_cosine(base: nn.Module, candidate: nn.Module, permutation: Permutation | None = None) -> float:
    """The ``cos`` statistic: the mean over weight matrices of their cosine similarity.

    Only matrices count: norm weights start at one and stay near it in every model, so their
    cosine is near 1 whatever the relation and would only dilute the statistic."""
    matrices = {n for n, p in base.named_parameters() if p.dim() == 2}
    return float(np.mean([c for n, c in weight_cosines(base, candidate, permutation).items() if n in matrices]))


def null_statistics(statistic, base: nn.Module, candidate: nn.Module, permutations: int, seed: int) -> list[float]:
    """The statistic of `permutations` randomly permuted copies of the candidate (residual and MLP units)."""
    return [statistic(base, candidate, random_permutation(candidate, seed + 1 + k)) for k in range(permutations)]
