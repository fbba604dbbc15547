"""Is a candidate derived from a base? Weight and embedding similarity, the matching test, and permutation p-values."""

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


@torch.no_grad()
def unit_matchings(base: nn.Module, candidate: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the two matchings of the base's MLP units to the candidate's: from the gate rows alone and from
    the up rows alone (Hungarian, cosine; the residual dimensions aligned by the embeddings first).

    Each is an array over the base's units holding the candidate unit matched to it."""
    check_comparable(base, candidate)
    hidden = align_hidden(base, candidate)
    out = []
    for lb, lc in zip(decoder_layers(base), decoder_layers(candidate)):
        matched = []
        for name in ("gate_proj", "up_proj"):
            w_b = getattr(lb.mlp, name).weight
            w_c = getattr(lc.mlp, name).weight.index_select(1, hidden.to(w_b.device))
            matched.append(assignment(unit_rows(w_b) @ unit_rows(w_c).T).numpy())
        out.append((matched[0], matched[1]))
    return out


def agreements(gate: np.ndarray, up: np.ndarray) -> int:
    """The base units that both matchings send to the same candidate unit."""
    return int((gate == up).sum())


def null_agreements(gate: np.ndarray, up: np.ndarray, permutations: int, generator: np.random.Generator) -> list[int]:
    """The agreements after shuffling the candidate's up-projection units against its gate units, `permutations` times.

    Shuffling the candidate's up rows by ``s`` (``new[k] = old[s[k]]``) and matching them again moves the
    up matching to ``argsort(s)[up]`` (the assignment is equivariant), so no assignment is recomputed.
    Each shuffle is drawn in the base's unit order, as ``r`` giving the up matching ``up[r]`` (that of
    ``s = argsort(up[r][argsort(up)])``): the draws, like the statistic, then do not depend on how the
    candidate labels its units.  Whatever the models, this null is the number of fixed points of a
    uniformly random permutation (mean 1, variance 1).
    """
    return [agreements(gate, up[generator.permutation(len(up))]) for _ in range(permutations)]


@torch.no_grad()
def matching_test(base: nn.Module, candidate: nn.Module, permutations: int, seed: int = 0) -> dict:
    """Do the gate and the up projection of each MLP match the candidate's units to the base's in the same way?

    The idea is Zhu et al. 2025, "Independence Tests for Language Models" (ICML): two matchings of the
    hidden units found independently from different weights agree for a model derived from the base and
    not for an independent one; per-layer p-values combined with Fisher's method.  Their statistic, the
    Spearman correlation of the two matchings, reads the candidate's unit indices as numbers, so it
    changes when the candidate's units are relabelled (a function-preserving permutation); ours counts the
    units on which the matchings agree, which no relabelling of the candidate changes (both matchings move
    together).  Like theirs, the p-value is not exact: it assumes that, for an independent candidate, the
    gate matching and the up matching are no more alike than two unrelated ones.

    Returns per layer ``agreements``, ``null`` (the null's draws) and ``p_layers``; ``units`` (units per
    layer) and ``p_value`` (Fisher's combination).
    """
    from scipy.stats import chi2

    generator = np.random.default_rng(seed)
    found, nulls, ps = [], [], []
    matchings = unit_matchings(base, candidate)
    for gate, up in matchings:
        observed = agreements(gate, up)
        null = null_agreements(gate, up, permutations, generator)
        found.append(observed)
        nulls.append(null)
        ps.append(permutation_p_value(observed, null))
    statistic = -2 * sum(math.log(p) for p in ps)
    return {"agreements": found, "units": len(matchings[0][0]), "null": nulls, "p_layers": ps,
            "p_value": float(chi2.sf(statistic, 2 * len(ps)))}


def mean_weight_cosine(base: nn.Module, candidate: nn.Module, permutation: Permutation | None = None) -> float:
    """The ``cos`` statistic: the mean over weight matrices of their cosine similarity.

    Only matrices count: norm weights start at one and stay near it in every model, so their
    cosine is near 1 whatever the relation and would only dilute the statistic."""
    matrices = {n for n, p in base.named_parameters() if p.dim() == 2}
    return float(np.mean([c for n, c in weight_cosines(base, candidate, permutation).items() if n in matrices]))


def null_statistics(statistic, base: nn.Module, candidate: nn.Module, permutations: int, seed: int) -> list[float]:
    """The statistic of `permutations` randomly permuted copies of the candidate (residual and MLP units)."""
    return [statistic(base, candidate, random_permutation(candidate, seed + 1 + k)) for k in range(permutations)]


def layer_cosines(base: nn.Module, cosines: dict[str, float]) -> list[float]:
    """Per decoder layer, the mean of `cosines` (``weight_cosines``' output) over the layer's weight matrices."""
    names = {id(p): n for n, p in base.named_parameters()}
    return [float(np.mean([cosines[names[id(p)]] for p in layer.parameters() if p.dim() == 2]))
            for layer in decoder_layers(base)]
