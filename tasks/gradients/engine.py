"""Per-sample loss gradients of a causal language model, a whole batch per backward pass.

One ordinary batched forward and backward runs with every parameter frozen; hooks
catch each module's input and the gradient of its output, and the per-sample
parameter gradients are formed from those two factors:

- ``nn.Linear``: the gradient of sample ``b`` is ``sum_t g[b, t] (x) a[b, t]``, one
  batched matrix product (the FLOPs of a plain backward's weight gradient);
- ``nn.Embedding``: the output gradients are scattered onto the rows of the tokens;
- a module whose output is elementwise affine in a 1-D weight (RMSNorm scales,
  q/k norms; checked numerically once per module): ``sum_t g[b, t] * f(x[b, t])``;
- any other module that owns parameters: a vector-Jacobian product of that module
  alone, vmapped over the batch.

Samples in a batch never interact (no batch norm in these models), so the gradient
of ``sum_b loss_b`` with respect to a module's output, restricted to sample ``b``,
is exactly the gradient of ``loss_b``.  Padding goes on the right with labels set
to the ignore index; under causal attention the padded positions cannot reach the
real ones, so no attention mask is needed and batching changes no result.

The per-sample gradients are written into buffers that live as long as the
extractor: freshly allocated multi-megabyte outputs cost page faults that, on a
CPU, halve the rate of the batched products.

Projections can be made during the backward pass (:class:`Projection`), for models
whose gradients are too large to keep: a tensor that is projected but not kept is
formed in one scratch buffer shared by all tensors and projected at once, so memory
holds one tensor's per-sample gradients rather than the whole model's.  A projector
with ``factors`` (the Kronecker kind) is applied to the two factors of a linear or
embedding layer's gradient, which is then never formed at all.

The gradient with respect to the input embeddings (``inputs_embeds``, the embedding
layer's output) can be asked for beside or instead of parameters, under the name
:data:`INPUTS_EMBEDS`: per token (``embeds_pooling="tokens"``, a (max_tokens, hidden)
row zero past the sample's end) or its mean over the sample's tokens ("mean").  It is the
gradient of the output the hook already marks as requiring grad, read as it passes; a
padded position past a sample's end gets exactly zero (nothing causal depends on it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from gradlake.tasks.common.loss import sample_losses


INPUTS_EMBEDS = "inputs_embeds"
EMBEDS_POOLING = ("tokens", "mean")


def embeds_shape(hidden: int, pooling: str, max_tokens: int) -> tuple[int, ...]:
    """The stored shape of one sample's input-embedding gradient."""
    if pooling not in EMBEDS_POOLING:
        raise ValueError(f"embeds pooling {pooling!r} is not one of {list(EMBEDS_POOLING)}")
    return (max_tokens, hidden) if pooling == "tokens" else (hidden,)


@dataclass
class Projection:
    """Projections to make during the backward pass.

    ``projectors`` maps a parameter name to an object with ``project((batch, numel)) ->
    (batch, k)``; one that also has ``factors = (p_out, p_in)`` is applied to a linear or
    embedding weight's factors.  ``key`` names the output a tensor's projection is added
    to (the same key for several tensors sums their projections).
    """

    projectors: dict[str, object]
    key: Callable[[str], str] = str


class PerSampleGradients:
    """Computes per-sample gradients of selected parameters of one model, batch by batch.

    Use as ``with PerSampleGradients(model, names) as grads: g = grads(ids, labels)``.
    The returned tensors are views of reused buffers, valid until the next call.  With
    ``projections``, ``grads.projected[i]`` holds the i-th projection's outputs
    ``{key: (batch, k)}`` after each call; ``names`` may then be empty.  The name
    :data:`INPUTS_EMBEDS` stands for the gradient with respect to the input embeddings,
    pooled as ``embeds_pooling`` says; per token it is ``max_tokens`` positions wide.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], projections: Sequence[Projection] = (),
                 embeds_pooling: str = "tokens", max_tokens: int | None = None):
        self.projections = list(projections)
        hooked = list(dict.fromkeys([*names, *(n for p in self.projections for n in p.projectors)]))
        if not hooked:
            raise ValueError("no parameter selected: pass at least one parameter name or projection")
        by_name = dict(model.named_parameters())
        unknown = [n for n in hooked if n not in by_name and n != INPUTS_EMBEDS]
        if unknown:
            raise ValueError(f"{unknown[:3]} are not parameters of the model; names look like {next(iter(by_name))!r}"
                             f" (or {INPUTS_EMBEDS!r} for the input embeddings)")
        self.model = model
        self.names = list(names)
        self._keep = set(names)
        self._hooked = hooked
        self._wanted = {id(by_name[n]): n for n in hooked if n != INPUTS_EMBEDS}
        self._shapes = {n: by_name[n].numel() for n in hooked if n != INPUTS_EMBEDS}
        self._embeds = INPUTS_EMBEDS in hooked
        if self._embeds:
            if embeds_pooling == "tokens" and not max_tokens:
                raise ValueError("input-embedding gradients per token need max_tokens, the width of the token axis")
            self._pooling, self._max_tokens = embeds_pooling, max_tokens
            hidden = model.get_input_embeddings().weight.shape[1]
            self._shapes[INPUTS_EMBEDS] = math.prod(embeds_shape(hidden, embeds_pooling, max_tokens or 1))
        self._lengths: torch.Tensor | None = None
        # Tensors projected but not kept are formed one at a time in a scratch buffer this wide.
        self._scratch_width = max((self._shapes[n] for n in hooked if n not in self._keep), default=0)
        self._buffers: dict[str, torch.Tensor] = {}
        self._scratch: torch.Tensor | None = None
        self._written: set[str] = set()
        self._dense_after: dict[str, list[int]] = {}
        self.projected: list[dict[str, torch.Tensor]] = [{} for _ in self.projections]
        self._recording = False
        self._weight_roles: dict[int, str] = {}
        self._handles: list = []
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.losses: torch.Tensor | None = None

    def __enter__(self) -> "PerSampleGradients":
        self._requires = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        # With every parameter frozen, the graph starts at the embedding output; this hook
        # is registered first so that it runs before the collector's hook on that module.
        embed = self.model.get_input_embeddings()
        self._handles.append(embed.register_forward_hook(self._embedding_output))
        for module in self.model.modules():
            owned = {k: p for k, p in module.named_parameters(recurse=False) if id(p) in self._wanted}
            if owned:
                self._handles.append(module.register_forward_hook(self._forward_hook(owned)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires[n])

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Gradient of each sample's mean token loss: ``{name: (batch, numel)}``.

        ``input_ids`` and ``labels`` are (batch, tokens), right-padded, labels -100 where
        no loss is taken.  ``lengths``: each sample's tokens before the padding (default:
        all), which the mean over tokens of an input-embedding gradient divides by.
        """
        if not self._handles:
            raise RuntimeError("PerSampleGradients must be used inside a `with` block")
        if self._embeds:
            tokens = input_ids.shape[1]
            if self._pooling == "tokens" and tokens > self._max_tokens:
                raise ValueError(f"a batch {tokens} tokens wide does not fit the input-embedding gradients' token axis "
                                 f"of {self._max_tokens}")
            self._lengths = (torch.full((input_ids.shape[0],), tokens, device=input_ids.device) if lengths is None
                             else torch.as_tensor(lengths, device=input_ids.device))
        self._written.clear()
        self._dense_after = {}
        self.projected = [{} for _ in self.projections]
        self._recording = True
        batch, tokens = input_ids.shape
        # Positions given one row per sample: a learned position embedding (GPT-2's wpe) would otherwise see
        # one (1, tokens) row broadcast over the batch, and its output gradient would be the batch's sum.
        extra = {"position_ids": torch.arange(tokens, device=input_ids.device).expand(batch, tokens)} \
            if self._takes_positions else {}
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, **extra).logits
                losses = sample_losses(logits, labels)
                losses.sum().backward()
        finally:
            self._recording = False
        self.losses = losses.detach()
        missing = [n for n in self._hooked if n not in self._written]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[:3]}: these parameters do not influence the loss")
        kept = {n: self._buffers[n][:batch] for n in self.names}
        for name, dense in self._dense_after.items():  # kept tensors are projected once, whole
            for j in dense:
                self._add_projection(j, name, self.projections[j].projectors[name].project(kept[name]))
        return kept

    # -- where contributions go -----------------------------------------------------------

    def _routes(self, name: str, factorable: bool) -> tuple[list[int], list[int]]:
        """Which projections take `name` through its factors, and which need its full gradient."""
        factored, dense = [], []
        for j, p in enumerate(self.projections):
            if name in p.projectors:
                (factored if factorable and hasattr(p.projectors[name], "factors") else dense).append(j)
        return factored, dense

    def _needs_full(self, name: str, dense: list[int]) -> bool:
        return name in self._keep or bool(dense)

    def _dest(self, name: str, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Where a contribution to `name` is written, and whether it adds to what is there."""
        if name in self._keep:
            return self._buffer(name, batch, like), name in self._written
        numel = self._shapes[name]
        need = batch * self._scratch_width
        if self._scratch is None or self._scratch.numel() < need or self._scratch.dtype != like.dtype \
                or self._scratch.device != like.device:
            self._scratch = torch.empty(need, dtype=like.dtype, device=like.device)
        return self._scratch[: batch * numel].view(batch, numel), False

    def _contributed(self, name: str, value: torch.Tensor, dense: list[int]) -> None:
        """A contribution to `name` is complete in `value`: project it now unless the tensor is kept."""
        self._written.add(name)
        if name in self._keep:
            if dense:
                self._dense_after[name] = dense
            return
        for j in dense:
            self._add_projection(j, name, self.projections[j].projectors[name].project(value))

    def _add_projection(self, j: int, name: str, value: torch.Tensor) -> None:
        out, key = self.projected[j], self.projections[j].key(name)
        if key in out:
            out[key].add_(value)
        else:
            out[key] = value

    def _buffer(self, name: str, batch: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < batch or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(batch, self._shapes[name], dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:batch]

    def _embedding_output(self, mod, inputs, output):
        # With every parameter frozen, the graph starts here.
        output.requires_grad_(True)
        if self._embeds and self._recording:
            output.register_hook(lambda g: self._embeds_gradient(g.detach()))

    def _embeds_gradient(self, g: torch.Tensor) -> None:
        """The gradient of sum_b loss_b w.r.t. the embedding output: row b is d loss_b / d inputs_embeds[b]."""
        batch, tokens, hidden = g.shape
        real = torch.arange(tokens, device=g.device) < self._lengths[:, None]  # (batch, tokens)
        g = g * real[..., None].to(g.dtype)
        if self._pooling == "mean":
            self._store(INPUTS_EMBEDS, g.sum(dim=1) / self._lengths[:, None].to(g.dtype))
            return
        _, dense = self._routes(INPUTS_EMBEDS, factorable=False)
        out, add = self._dest(INPUTS_EMBEDS, batch, g)
        out3 = out.view(batch, self._max_tokens, hidden)
        out3[:, tokens:].zero_()
        out3[:, :tokens] = g
        self._contributed(INPUTS_EMBEDS, out, dense)

    def _forward_hook(self, owned: dict[str, nn.Parameter]):
        names = {local: self._wanted[id(p)] for local, p in owned.items()}

        def hook(mod, inputs, output):
            # Off while a module's own vector-Jacobian product re-runs its forward.
            if not self._recording or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                # A module fed by no other parameter (a learned position embedding reads only positions):
                # with every parameter frozen, its output starts a graph of its own here.
                output.requires_grad_(True)
            x, y = inputs[0].detach(), output.detach()
            output.register_hook(lambda g: self._per_sample(mod, x, y, g.detach(), owned, names))

        return hook

    def _per_sample(self, mod, x, y, g, owned, names) -> None:
        batch = g.shape[0]
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            x = x.reshape(batch, -1, x.shape[-1]).to(g.dtype)
            g = g.reshape(batch, -1, g.shape[-1])
            # The weight's gradient is sum_t left_t^T right_t, (rows, cols) as the weight is stored: (out, in) for
            # nn.Linear (y = x W^T), (in, out) for GPT-2's Conv1D (y = x W).
            left, right = (g, x) if isinstance(mod, nn.Linear) else (x, g)
            if "weight" in owned:
                name = names["weight"]
                rows, cols = left.shape[-1], right.shape[-1]
                factored, dense = self._routes(name, factorable=True)
                for j in factored:  # sum_t (P_out^T left_t)(P_in^T right_t)^T: the gradient is never formed
                    p_out, p_in = self.projections[j].projectors[name].factors
                    self._add_projection(j, name, torch.bmm((left.float() @ p_out).transpose(1, 2),
                                                            right.float() @ p_in).reshape(batch, -1))
                if self._needs_full(name, dense):
                    out, add = self._dest(name, batch, g)
                    if add:  # a tied parameter collects from every use
                        out.view(batch, rows, cols).baddbmm_(left.transpose(1, 2), right)
                    else:
                        torch.bmm(left.transpose(1, 2), right, out=out.view(batch, rows, cols))
                    self._contributed(name, out, dense)
                self._written.add(name)
            if "bias" in owned:
                self._store(names["bias"], g.sum(dim=1))
        elif isinstance(mod, nn.Embedding) and set(owned) == {"weight"}:
            name = names["weight"]
            dim = g.shape[-1]
            g = g.reshape(batch, -1, dim)
            factored, dense = self._routes(name, factorable=True)
            for j in factored:  # the gradient is sum_t e_{token t} g_t^T: P_out's rows of the tokens times P_in^T g_t
                p_out, p_in = self.projections[j].projectors[name].factors
                rows = p_out[x.reshape(batch, -1)]
                self._add_projection(j, name, torch.bmm(rows.transpose(1, 2), g.float() @ p_in).reshape(batch, -1))
            if self._needs_full(name, dense):
                out, add = self._dest(name, batch, g)
                out3 = out.view(batch, mod.num_embeddings, dim)
                if not add:
                    out3.zero_()
                out3.scatter_add_(1, x.reshape(batch, -1, 1).expand(-1, -1, dim), g)
                self._contributed(name, out, dense)
            self._written.add(name)
        elif set(owned) == {"weight"} and (kind := self._weight_role(mod, x)) != "other":
            # y = w * f(x) + c(x) elementwise (RMSNorm and its kin): dL/dw = sum_t g * f(x).
            w = owned["weight"].detach()
            if kind == "scale" and bool((w != 0).all()):
                f = y / w  # c(x) = 0: f(x) is the output over the weight, no second forward
            else:
                self._recording = False
                try:
                    with torch.no_grad():
                        f = functional_call(mod, {"weight": torch.ones_like(w)}, (x,)) - functional_call(
                            mod, {"weight": torch.zeros_like(w)}, (x,))
                finally:
                    self._recording = True
            value = (g * f.to(g.dtype)).reshape(batch, -1, w.numel()).sum(dim=1)
            self._store(names["weight"], value)
        else:
            params = {k: p.detach() for k, p in owned.items()}

            def one(xb, gb):
                _, pull = vjp(lambda ps: functional_call(mod, ps, (xb.unsqueeze(0),)), params)
                return pull(gb.unsqueeze(0))[0]

            self._recording = False
            try:
                per_sample = vmap(one)(x, g)
            finally:
                self._recording = True
            for local, value in per_sample.items():
                self._store(names[local], value.reshape(batch, -1))

    def _weight_role(self, mod: nn.Module, x: torch.Tensor) -> str:
        """How the output depends on a 1-D weight, tested numerically once per module.

        'scale': y = w * f(x); 'affine': y = w * f(x) + c(x); 'other': anything else.
        """
        verdict = self._weight_roles.get(id(mod))
        if verdict is None:
            w = mod.weight.detach()
            verdict = "other"
            if w.dim() == 1 and x.shape[-1] == w.numel():
                probe = x[:1, :4].detach()
                r = torch.rand(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(w) + 0.5
                self._recording = False
                try:
                    with torch.no_grad():
                        f0, f1, fr = (functional_call(mod, {"weight": v}, (probe,)).double()
                                      for v in (torch.zeros_like(w), torch.ones_like(w), r))
                finally:
                    self._recording = True
                slope = f1 - f0
                tol = (1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5) * slope.abs().max().clamp_min(1e-12)
                if (fr - f0 - r.double() * slope).abs().max() <= 3 * tol:
                    verdict = "scale" if f0.abs().max() <= tol else "affine"
            self._weight_roles[id(mod)] = verdict
        return verdict

    def _store(self, name: str, value: torch.Tensor) -> None:
        """A contribution computed as a fresh tensor (modules without a factored form)."""
        _, dense = self._routes(name, factorable=False)
        if name in self._keep:
            out = self._buffer(name, value.shape[0], value)
            if name in self._written:
                out.add_(value)
            else:
                out.copy_(value)
            value = out
        self._contributed(name, value, dense)


def _is_conv1d(mod: nn.Module) -> bool:
    """GPT-2's linear layer with the weight stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; the class may move
        return False
    return isinstance(mod, Conv1D)


def per_sample_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's mean token loss for the named parameters, ``{name: (batch, numel)}``.

    A one-shot convenience around :class:`PerSampleGradients`; the result is owned by the caller.
    """
    with PerSampleGradients(model, names) as grads:
        return {n: g.clone() for n, g in grads(input_ids, labels).items()}
