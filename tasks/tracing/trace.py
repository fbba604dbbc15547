"""Model tracing: is a candidate model derived from a base?  Permutation, alignment and statistics.

A decoder's function is unchanged when the hidden units of an MLP are permuted (the rows
of its gate and up projections and the columns of its down projection together), or when
the dimensions of the residual stream are permuted (the columns of the embeddings, of every
projection reading the stream and of the output layer, the rows of every projection writing
to it, and the weights of the norms acting on it).  A weight-by-weight comparison of two
models is fooled by either; aligning the candidate back to the base undoes them.

Everything here works on the architecture's real modules (OLMo and OLMo-2 decoders:
``model.layers[i].self_attn`` / ``.mlp``) through one map, :func:`permutation_axes`, from
each parameter to the axes a permutation acts on; permuting, aligning and comparing all
read it, so they cannot disagree.  A permutation ``p`` of an axis means ``new[i] = old[p[i]]``.

Statistics (each against the base, on the candidate as given or aligned):

- ``cos``: the mean cosine similarity of the weight matrices;
- ``emb``: the mean cosine similarity of the input embeddings, token by token;
- ``mode``: the loss along the straight line between the two models' weights, and its
  barrier (the largest excess of that loss over the line between the end points' losses).

Their p-values come from permutation tests: under the null hypothesis that the candidate was
trained independently of the base, its hidden units and residual dimensions are exchangeable
(training is equivariant to permuting them), so the statistic of randomly permuted copies of
the candidate is distributed as the observed one.  ``p = (1 + #{null >= observed}) / (1 + n)``
for ``n`` permutations (``<=`` for the barrier, where small means related).  An aligned
statistic is maximised over permutations by the alignment itself, so this null does not hold
for it; its p-value is that of the matching test (:func:`matching_test`): the alignments found
independently from the gate and from the up projection of each MLP agree for a derived model
and not for an independent one (Spearman correlation, permutation p-value per layer, combined
over layers with Fisher's method).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from gradlake.lake.store import LakeStore
from gradlake.tasks.common.lineage import gradlake_version, lake_keys
from gradlake.tasks.common.model import ModelSpec, check_model, check_weights, lake_names, parameter_shapes, resolved_commit

HIDDEN = "hidden"
MLP = "mlp"
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # linear layers whose input is the residual stream
WRITERS = ("o_proj", "down_proj")  # linear layers whose output is added to it


class TracingError(ValueError):
    """Two models that cannot be compared, or a setting that is not known."""


@dataclass(frozen=True)
class Axis:
    """One axis of a parameter that a permutation acts on: of the residual stream, or of layer `layer`'s MLP."""

    axis: int
    kind: str  # HIDDEN or MLP
    layer: int | None = None


# model_type -> class: the architectures whose function-preserving permutations tracing knows (tests/test_tracing.py).
TRACING_ARCHITECTURES = {"olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM"}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TracingError(f"{type(model).__name__} has no decoder layers at model.layers; tracing knows OLMo and OLMo-2 "
                           "style decoders (model.layers[i].self_attn, .mlp)")
    return list(layers)


def permutation_axes(model: nn.Module) -> dict[str, list[Axis]]:
    """Every parameter a hidden-unit or residual permutation touches, and the axes it acts on."""
    hidden = model.get_input_embeddings().weight.shape[1]
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    axes: dict[str, list[Axis]] = {}

    def add(param: nn.Parameter | None, *found: Axis) -> None:
        if param is not None:
            axes.setdefault(names[id(param)], []).extend(found)

    add(model.get_input_embeddings().weight, Axis(1, HIDDEN))
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        add(output.weight, Axis(1, HIDDEN))
    for index, layer in enumerate(decoder_layers(model)):
        for part in (layer.self_attn, layer.mlp):
            for name in READERS + WRITERS:
                linear = getattr(part, name, None)
                if linear is None:
                    continue
                if linear.weight.shape[0 if name in WRITERS else 1] != hidden:
                    raise TracingError(f"{type(part).__name__}.{name} of layer {index} does not read or write the "
                                       f"residual stream of width {hidden}")
                found = [Axis(1, HIDDEN) if name in READERS else Axis(0, HIDDEN)]
                if name in ("gate_proj", "up_proj"):
                    found.append(Axis(0, MLP, index))
                elif name == "down_proj":
                    found.append(Axis(1, MLP, index))
                add(linear.weight, *found)
                if linear.bias is not None and name in WRITERS:
                    add(linear.bias, Axis(0, HIDDEN))
                elif linear.bias is not None and name in ("gate_proj", "up_proj"):
                    add(linear.bias, Axis(0, MLP, index))
        for child_name, child in layer.named_children():  # norms on the stream (not the attention's q/k norms)
            weight = getattr(child, "weight", None)
            if child_name not in ("self_attn", "mlp") and isinstance(weight, nn.Parameter) and weight.shape == (hidden,):
                add(weight, Axis(0, HIDDEN))
                if isinstance(getattr(child, "bias", None), nn.Parameter):
                    add(child.bias, Axis(0, HIDDEN))
    final = getattr(model.model, "norm", None)
    if isinstance(getattr(final, "weight", None), nn.Parameter):
        add(final.weight, Axis(0, HIDDEN))
    return axes


def mlp_width(model: nn.Module) -> int:
    return decoder_layers(model)[0].mlp.gate_proj.weight.shape[0]


@dataclass
class Permutation:
    """A residual permutation (or None) and one permutation per MLP layer (or None)."""

    hidden: torch.Tensor | None = None
    mlp: list[torch.Tensor] | None = None

    def of(self, axis: Axis) -> torch.Tensor | None:
        if axis.kind == HIDDEN:
            return self.hidden
        return None if self.mlp is None else self.mlp[axis.layer]

    def inverse(self) -> "Permutation":
        return Permutation(None if self.hidden is None else torch.argsort(self.hidden),
                           None if self.mlp is None else [torch.argsort(p) for p in self.mlp])


def random_permutation(model: nn.Module, seed: int, hidden: bool = True, mlp: bool = True) -> Permutation:
    """Random residual and MLP permutations of a model's shape, from one seed."""
    generator = torch.Generator().manual_seed(seed)
    width = model.get_input_embeddings().weight.shape[1]
    return Permutation(torch.randperm(width, generator=generator) if hidden else None,
                       [torch.randperm(mlp_width(model), generator=generator) for _ in decoder_layers(model)]
                       if mlp else None)


def permuted(tensor: torch.Tensor, axes: Sequence[Axis], permutation: Permutation) -> torch.Tensor:
    """A parameter's values under a permutation (a new tensor where anything moves)."""
    for axis in axes:
        p = permutation.of(axis)
        if p is not None:
            tensor = tensor.index_select(axis.axis, p.to(tensor.device))
    return tensor


@torch.no_grad()
def permute_model(model: nn.Module, permutation: Permutation) -> nn.Module:
    """Permute a model in place (tied weights once); the function it computes is unchanged."""
    params = dict(model.named_parameters())
    for name, axes in permutation_axes(model).items():
        params[name].copy_(permuted(params[name], axes, permutation))
    return model


def check_comparable(base: nn.Module, candidate: nn.Module) -> None:
    """One clear error when two models do not share parameter names and shapes."""
    a = {n: tuple(p.shape) for n, p in base.named_parameters()}
    b = {n: tuple(p.shape) for n, p in candidate.named_parameters()}
    if a != b:
        only = sorted(set(a) ^ set(b))
        differ = [n for n in a if n in b and a[n] != b[n]]
        what = f"{only[0]!r} is in one model only" if only else f"{differ[0]!r} has shape {a[differ[0]]} vs {b[differ[0]]}"
        raise TracingError(f"the base and the candidate differ in their parameters ({what}); tracing compares "
                           "models of one architecture and size")


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)


def assignment(similarity: torch.Tensor) -> torch.Tensor:
    """For each row (a base unit) the column (a candidate unit) of a maximum-similarity perfect matching."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
    out = torch.empty(len(rows), dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return out


@torch.no_grad()
def align_hidden(base: nn.Module, candidate: nn.Module) -> torch.Tensor:
    """The residual permutation matching the candidate's embedding columns to the base's."""
    e_base = base.get_input_embeddings().weight
    e_cand = candidate.get_input_embeddings().weight
    return assignment(_unit_rows(e_base.T) @ _unit_rows(e_cand.T).T)


@torch.no_grad()
def align(base: nn.Module, candidate: nn.Module) -> Permutation:
    """The permutation that maps the candidate back onto the base.

    The residual dimensions are matched first, by the cosine of the embeddings' columns (the
    vocabulary's values of each dimension); then each MLP's hidden units by the cosine of their
    gate and up rows, read in the aligned residual order.  Both by the Hungarian algorithm.
    """
    check_comparable(base, candidate)
    hidden = align_hidden(base, candidate)
    return Permutation(hidden, [align_mlp(lb, lc, hidden) for lb, lc in zip(decoder_layers(base), decoder_layers(candidate))])


@torch.no_grad()
def align_mlp(base_layer: nn.Module, candidate_layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The permutation of one layer's MLP units matching the candidate's gate and up rows (read in the aligned
    residual order `hidden`) to the base's."""
    device = candidate_layer.mlp.gate_proj.weight.device
    rows_b = torch.cat([base_layer.mlp.gate_proj.weight, base_layer.mlp.up_proj.weight], dim=1)
    rows_c = torch.cat([candidate_layer.mlp.gate_proj.weight.index_select(1, hidden.to(device)),
                        candidate_layer.mlp.up_proj.weight.index_select(1, hidden.to(device))], dim=1)
    return assignment(_unit_rows(rows_b) @ _unit_rows(rows_c).T)


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
    return float((_unit_rows(e_base[kept]) * _unit_rows(e_cand[kept])).sum(dim=1).mean())


def permutation_p_value(observed: float, null: Sequence[float], larger_is_related: bool = True) -> float:
    """(1 + #{null at least as related as observed}) / (1 + n)."""
    null = np.asarray(null, dtype=float)
    hits = (null >= observed).sum() if larger_is_related else (null <= observed).sum()
    return float((1 + hits) / (1 + len(null)))


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
            matched.append(assignment(_unit_rows(w_b) @ _unit_rows(w_c).T).numpy())
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


# -- mode connectivity and perplexity -----------------------------------------------------------

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


# -- the stage: one base and one candidate, results into the lake ---------------------------------

STATISTICS = ("cos", "emb", "mode")
ALPHA = 0.01  # the level at which a p-value reads "derived"


class TraceSettings(BaseModel):
    """How a candidate is compared with its base: everything but the two models."""

    model_config = ConfigDict(extra="forbid")

    statistics: list[Literal["cos", "emb", "mode"]] = Field(default=list(STATISTICS), title="Statistics", description="'cos': cosine similarity of the weight matrices; 'emb': of the input embeddings, token by token; 'mode': the loss along the straight line between the two models (mode connectivity). Perplexity of both models is always reported.")
    permute: bool = Field(default=False, title="Permute the candidate first", description="Apply a random function-preserving permutation (residual dimensions and MLP units) to the candidate before anything: the control that fools an unaligned comparison.")
    permute_seed: int = Field(default=0, ge=0, title="Permutation seed", description="Seed of that permutation (recorded).")
    align: bool = Field(default=True, title="Align", description="Also align the candidate to the base (Hungarian algorithm on embedding columns, then each MLP's gate and up rows) and report every statistic aligned, with the matching test's p-value.")
    mode_attention: bool = Field(default=True, title="Attention on the path", description="Attention weights move along the interpolation path (off: they keep the base's values).")
    mode_embeddings: bool = Field(default=True, title="Embeddings on the path", description="Input and output embeddings move along the path (off: they keep the base's values).")
    dataset: str = Field(default="probe", title="Dataset", description="Dataset in the lake on which the losses and perplexities are measured.")
    variant: str = Field(default="original", title="Variant", description="Its variant.")
    paradigm: Literal["sft", "pre"] = Field(default="sft", title="Loss on", description="'sft': assistant tokens only; 'pre': every token (the extraction's loss convention).")
    n_samples: int = Field(default=64, ge=1, title="Samples", description="The first this many samples of the dataset.")
    max_length: int = Field(default=1024, ge=2, title="Max length (tokens)", description="Tokens per sample at most.")
    batch_size: int = Field(default=8, ge=1, title="Batch size", description="Samples per forward pass.")
    points: int = Field(default=11, ge=2, title="Interpolation points", description="Points on the line from the base (0) to the candidate (1), the end points included.")
    permutations: int = Field(default=100, ge=1, title="Permutations", description="Random permutations in each permutation test (the smallest p-value is 1 / (permutations + 1)).")
    seed: int = Field(default=0, ge=0, title="Test seed", description="Seed of the permutation tests' draws (recorded).")


LAKE_HELP = ("Lake URL: the dataset is read from it, the results written to it (s3://bucket/prefix, or file:///path on "
             "storage every worker shares).")


class _Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: ModelSpec = Field(title="Base model", description="The model the candidate may derive from (any checkpoint).")
    candidate: ModelSpec = Field(title="Candidate model", description="A fine-tune, a later checkpoint, or a model of unknown origin, of the same architecture and size.")
    lake: str = Field(title="Lake", description=LAKE_HELP)


class TraceSpec(TraceSettings, _Pair):  # the models and the lake come first in the Prefect form
    """Is `candidate` derived from `base`?  Everything one tracing run needs."""

    @property
    def model(self) -> ModelSpec:  # run names and logs name the candidate
        return self.candidate


def base_dir(base: ModelSpec) -> str:
    """``tracing/<base>/<checkpoint>``: every candidate traced against this base, and their summary table."""
    return "tracing/" + "/".join(lake_keys(base))


def tracing_dir(spec: TraceSpec) -> str:
    """``tracing/<base>/<checkpoint>/<candidate>/<checkpoint>`` with the lake's model and checkpoint keys."""
    return base_dir(spec.base) + "/" + "/".join(lake_keys(spec.candidate))


def summary_table(store: LakeStore, base: ModelSpec) -> pd.DataFrame:
    """One row per candidate traced against `base` in the lake: its verdict, p-value and main statistics."""
    from gradlake.lake.evaluations import list_tracing

    prefix = base_dir(base) + "/"
    rows = []
    for path, meta in list_tracing(store):
        if not path.startswith(prefix):
            continue
        results = pd.read_parquet(io.BytesIO(store.fs.cat_file(store.path(f"{path}/results.parquet"))))
        values = {(f"{r.statistic}{'_aligned' if r.aligned else ''}"): r.value for r in results.itertuples()}
        candidate = meta["lineage"]["candidate"]
        rows.append({"candidate": candidate["model"], "checkpoint": candidate["checkpoint"], "path": path,
                     "verdict": meta["verdict"], "derived": meta["summary"]["derived"],
                     "p_value": meta["summary"]["p_value"], "test": meta["summary"]["test"], **values,
                     "created_at": meta["lineage"]["created_at"]})
    return pd.DataFrame(rows)


def write_summary(store: LakeStore, base: ModelSpec) -> str:
    """``tracing/<base>/<checkpoint>/summary.parquet`` and ``summary.md`` over every candidate traced so far."""
    from gradlake.tasks.evaluate.report import markdown_table

    table = summary_table(store, base)
    directory = base_dir(base)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.fs.pipe_file(store.path(f"{directory}/summary.parquet"), buffer.getvalue())
    shown = [c for c in ("candidate", "checkpoint", "verdict", "cos", "cos_aligned", "emb", "emb_aligned", "mode",
                         "mode_aligned", "perplexity:candidate") if c in table.columns]
    text = f"# Candidates traced against {base.model}@{base.checkpoint or 'main'}\n\n{markdown_table(table[shown])}\n"
    store.fs.pipe_file(store.path(f"{directory}/summary.md"), text.encode())
    return directory


def plan_trace(spec: TraceSpec) -> dict:
    """Every input checked from configs and the lake, before any weight is loaded or anything written."""
    from gradlake.lake.datasets import dataset_meta

    unknown = sorted(set(spec.statistics) - set(STATISTICS))
    if unknown or not spec.statistics:
        raise TracingError(f"statistics {spec.statistics} must be one or more of {list(STATISTICS)}")
    shapes = []
    for role, model in (("base", spec.base), ("candidate", spec.candidate)):
        model = model.resolved()
        config = check_model(model)
        if config.model_type not in TRACING_ARCHITECTURES:  # from the config: before any weight is read
            raise TracingError(f"the {role} {model.model!r} is a {(config.architectures or [type(config).__name__])[0]}; "
                               f"tracing knows {', '.join(TRACING_ARCHITECTURES.values())} only")
        shapes.append(((config.architectures or [type(config).__name__])[0], parameter_shapes(model, config)))
    (arch_b, shapes_b), (arch_c, shapes_c) = shapes
    if arch_b != arch_c:
        raise TracingError(f"the base is a {arch_b} and the candidate a {arch_c}; tracing compares models of one architecture")
    if shapes_b != shapes_c:
        differ = sorted(set(shapes_b) ^ set(shapes_c)) or [n for n in shapes_b if shapes_b[n] != shapes_c[n]]
        raise TracingError(f"the base and the candidate differ in their parameters (first: {differ[0]!r}: "
                           f"{shapes_b.get(differ[0])} vs {shapes_c.get(differ[0])}); tracing compares models of one size")
    store = LakeStore(spec.lake)
    meta = dataset_meta(store, spec.dataset, spec.variant)  # a missing dataset or variant is named here
    for model in (spec.base, spec.candidate):
        check_weights(model.resolved(), check_model(model.resolved()))
    store.check_writable()
    return {"architecture": arch_b, "dataset_version": meta["version"], "dataset_hash": meta["content_hash"],
            "n_parameters": int(sum(math.prod(s) for s in shapes_b.values()))}


def evaluation_batches(spec: TraceSpec, tokenizer, config, log=print) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gradlake.lake.datasets import read_dataset
    from gradlake.tasks.common.loss import encode_sample, pad_batch
    from gradlake.tasks.common.model import capped_length

    frame = read_dataset(LakeStore(spec.lake), spec.dataset, spec.variant).head(spec.n_samples)
    max_length, capped = capped_length(spec.max_length, config, spec.base.model)
    if capped:
        log(capped)
    encoded = [encode_sample(tokenizer, chat, spec.paradigm, max_length) for chat in frame["messages"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [pad_batch(encoded[i:i + spec.batch_size], pad) for i in range(0, len(encoded), spec.batch_size)]


def trace_pair(spec: TraceSpec, log=print) -> tuple[dict[str, pd.DataFrame], dict]:
    """Load both models, compute every statistic asked for; returns (tables, summary)."""
    import time

    from gradlake.tasks.common.model import load_model, load_tokenizer

    started = time.monotonic()
    base = load_model(spec.base.resolved())
    candidate = load_model(spec.candidate.resolved())
    check_comparable(base, candidate)
    if spec.permute:  # a copy: the loaded model is cached for the next run in this process
        candidate = permute_model(copy.deepcopy(candidate), random_permutation(candidate, spec.permute_seed))
    batches = evaluation_batches(spec, load_tokenizer(spec.base.resolved()), base.config, log)
    aligned = None
    if spec.align:
        log("aligning the candidate to the base (Hungarian algorithm)")
        aligned = align(base, candidate)
    rows, curves = [], []
    variants = [(False, None)] + ([(True, aligned)] if spec.align else [])

    def row(statistic, is_aligned, value, p, test, n=None):
        rows.append({"statistic": statistic, "aligned": is_aligned, "value": float(value),
                     "p_value": None if p is None else float(p), "test": test, "permutations": n})

    matching = None
    if spec.align and ({"cos", "emb"} & set(spec.statistics)):
        log(f"matching test over {len(decoder_layers(base))} layers, {spec.permutations} permutations each")
        matching = matching_test(base, candidate, spec.permutations, spec.seed)
    for name, statistic in (("cos", mean_weight_cosine), ("emb", embedding_cosine)):
        if name not in spec.statistics:
            continue
        for is_aligned, permutation in variants:
            value = statistic(base, candidate, permutation)
            if is_aligned:
                row(name, True, value, matching["p_value"], "matching (gate vs up, Fisher)", spec.permutations)
            else:
                log(f"{name}: permutation test, {spec.permutations} permutations")
                null = null_statistics(statistic, base, candidate, spec.permutations, spec.seed)
                row(name, False, value, permutation_p_value(value, null), "permutation", spec.permutations)
    if "mode" in spec.statistics:
        for is_aligned, permutation in variants:
            log(f"mode connectivity ({'aligned' if is_aligned else 'unaligned'}): {spec.points} points")
            path = loss_path(base, candidate, batches, spec.points, permutation, spec.mode_attention, spec.mode_embeddings)
            curves += [{"aligned": is_aligned, "alpha": a, "loss": loss} for a, loss in path]
            row("mode", is_aligned, barrier(path), None, "none (loss barrier)")
    for role, model in (("base", base), ("candidate", candidate)):
        value = perplexity(model, batches)
        row(f"perplexity:{role}", False, value, None, "none")
    unaligned = weight_cosines(base, candidate)
    tensors = pd.DataFrame({"tensor": list(unaligned), "cosine": list(unaligned.values())})
    if spec.align:
        tensors["cosine_aligned"] = list(weight_cosines(base, candidate, aligned).values())
    results = pd.DataFrame(rows)
    results["permutations"] = results["permutations"].astype("Int64")
    decisive = results[(results["aligned"] == spec.align) & results["p_value"].notna()]
    p = float(decisive["p_value"].min()) if len(decisive) else None
    summary = {"p_value": p, "derived": None if p is None else p < ALPHA, "test": None if p is None else
               decisive.loc[decisive["p_value"].idxmin(), "test"], "seconds": time.monotonic() - started,
               "matching_rho": None if matching is None else matching["rho"]}
    tables = {"results": results, "path": pd.DataFrame(curves, columns=["aligned", "alpha", "loss"]), "tensors": tensors}
    return tables, summary


def verdict(summary: dict) -> str:
    if summary["p_value"] is None:
        return "no test was run (statistics without a p-value only)"
    if summary["derived"]:
        return f"derived (p = {summary['p_value']:.2g} < {ALPHA}, {summary['test']} test)"
    return f"no evidence of derivation (p = {summary['p_value']:.2g}, {summary['test']} test)"


def path_plot(curve: pd.DataFrame) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for is_aligned, part in curve.groupby("aligned"):
        ax.plot(part["alpha"], part["loss"], marker="o", label="aligned" if is_aligned else "unaligned")
    ax.set_xlabel("alpha (0: base, 1: candidate)")
    ax.set_ylabel("mean token loss")
    ax.set_title("Loss along the straight line between the models")
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def tracing_report(spec: TraceSpec, tables: dict[str, pd.DataFrame], summary: dict) -> str:
    from gradlake.tasks.evaluate.report import markdown_table

    lines = [f"# Model tracing: {spec.candidate.model}@{spec.candidate.checkpoint or 'main'} against "
             f"{spec.base.model}@{spec.base.checkpoint or 'main'}", "",
             f"**Verdict: {verdict(summary)}**", "",
             "p-values: unaligned statistics against randomly permuted copies of the candidate "
             f"({spec.permutations} permutations); aligned ones from the matching test (the alignments found from "
             "each MLP's gate and from its up projection agree for a derived model). `mode` is the loss barrier "
             "along the straight line between the models (no p-value).", "",
             markdown_table(tables["results"]), ""]
    if len(tables["path"]):
        lines += ["![loss along the path](plots/loss_path.png)", ""]
    return "\n".join(lines)


def run_trace(spec: TraceSpec, log=print, planned: dict | None = None) -> str:
    """Check (unless `planned` is `plan_trace`'s result already), compute, write `tracing/...` (tables, plot, report,
    meta.json last); returns the directory."""
    import datetime as dt
    import io
    import json

    planned = planned or plan_trace(spec)
    directory = tracing_dir(spec)
    tables, summary = trace_pair(spec, log)
    store = LakeStore(spec.lake)
    fs = store.fs
    meta_path = store.path(f"{directory}/meta.json")
    if fs.exists(meta_path):
        fs.rm(meta_path)  # a rerun replaces the result; until meta.json is back it is not complete
    fs.makedirs(store.path(f"{directory}/plots"), exist_ok=True)
    for name, frame in tables.items():
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        fs.pipe_file(store.path(f"{directory}/{name}.parquet"), buffer.getvalue())
    plots = ["loss_path.png"] if len(tables["path"]) else []
    if plots:
        fs.pipe_file(store.path(f"{directory}/plots/loss_path.png"), path_plot(tables["path"]))
    fs.pipe_file(store.path(f"{directory}/report.md"), tracing_report(spec, tables, summary).encode())
    lineage = {role: {"model": lake_names(m)[0], "checkpoint": lake_names(m)[1], "resolved_commit": resolved_commit(m.resolved())}
               for role, m in (("base", spec.base), ("candidate", spec.candidate))}
    meta = {"lineage": lineage | {"architecture": planned["architecture"], "dataset": spec.dataset, "variant": spec.variant,
                                  "dataset_version": planned["dataset_version"], "dataset_hash": planned["dataset_hash"],
                                  "permute_seed": spec.permute_seed if spec.permute else None, "test_seed": spec.seed,
                                  "settings": spec.model_dump(exclude={"lake", "base", "candidate"}),
                                  "gradlake_version": gradlake_version(),
                                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
            "summary": summary, "verdict": verdict(summary), "tables": sorted(tables), "plots": plots}
    fs.pipe_file(meta_path, json.dumps(meta, indent=2, default=str).encode())
    log(f"{verdict(summary)}; results at {spec.lake}/{directory}")
    return directory
