"""Mode connectivity: the loss along the straight path between two models' weights, its barrier, and perplexity."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gradlake.tasks.tracing.permutation import Permutation, TracingError, permutation_axes, permuted


def interpolation_names(model: nn.Module, attention: bool, embeddings: bool) -> list[str]:
    """The parameters that move along the path; the others keep the base's values."""
    embedding_ids = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids.add(id(output.weight))
    out = []
    for name, p in model.named_parameters():
        if not embeddings and id(p) in embedding_ids:
            continue
        if not attention and ".self_attn." in name:
            continue
        out.append(name)
    return out


@torch.no_grad()
def token_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean token cross-entropy over every label position of every batch (the extraction's loss, token-weighted)."""
    from gradlake.tasks.common.loss import IGNORE_INDEX, sample_losses

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids, labels in batches:
        ids, labels = ids.to(device), labels.to(device)
        per_sample = sample_losses(model(input_ids=ids).logits, labels)
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        total += float((per_sample.double() * tokens).sum())
        count += int(tokens.sum())
    if not count:
        raise TracingError("the evaluation samples have no label token")
    return total / count


def perplexity(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return math.exp(token_loss(model, batches))


@torch.no_grad()
def loss_path(base: nn.Module, candidate: nn.Module, batches, points: int, permutation: Permutation | None = None,
              attention: bool = True, embeddings: bool = True) -> list[tuple[float, float]]:
    """(alpha, loss) at `points` evenly spaced points of the line from the base (0) to the candidate (1)."""
    if points < 2:
        raise TracingError(f"interpolation points {points} must be 2 or more (the two end points at least)")
    moving = set(interpolation_names(base, attention, embeddings))
    axes = permutation_axes(candidate)
    cand = dict(candidate.named_parameters())
    ends = {}
    for name, p in base.named_parameters():
        if name in moving:
            c = cand[name]
            if permutation is not None and name in axes:
                c = permuted(c, axes[name], permutation)
            ends[name] = (p.detach().clone(), c.detach().to(p.device, p.dtype))
    walker = copy.deepcopy(base)
    params = dict(walker.named_parameters())
    path = []
    for alpha in np.linspace(0.0, 1.0, points):
        for name, (a, b) in ends.items():
            params[name].copy_(torch.lerp(a, b, float(alpha)))
        path.append((float(alpha), token_loss(walker, batches)))
    return path


def barrier(path: Sequence[tuple[float, float]]) -> float:
    """The largest excess of the loss along the path over the straight line between its end points' losses."""
    (a0, l0), (a1, l1) = path[0], path[-1]
    return max(loss - (l0 + (alpha - a0) / (a1 - a0) * (l1 - l0)) for alpha, loss in path)
