"""Weight-space symmetries of a transformer: the permutations that leave its function unchanged, and aligning one model to another (Hungarian algorithm)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


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


def unit_rows(x: torch.Tensor) -> torch.Tensor:
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
    return assignment(unit_rows(e_base.T) @ unit_rows(e_cand.T).T)


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
    return assignment(unit_rows(rows_b) @ unit_rows(rows_c).T)
