"""What a random projection is: kind, scope, dimension and seed, parsed from text and checked against the tensors' shapes."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


ROUND_TO = 512


class ProjectionError(ValueError):
    """Projection settings that cannot work, with what would be accepted."""


class ProjectionSpec(BaseModel):
    """One random projection setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["rademacher", "gaussian", "sparse", "kronecker"] = Field(default="rademacher", description="Entries of the random matrix: +-1 (rademacher), N(0,1) (gaussian), a sparse JL transform with a few +-1 per input coordinate (sparse; for very large dimensions on a CPU), or P_out (x) P_in applied to a weight's two factors without forming its gradient (kronecker; 2-D weights, scope 'per_tensor').")
    dim: int = Field(description="Output dimension: per tensor for scope 'per_tensor', in total for 'proportional' and 'flat'. For 'kronecker', k_out * k_in.")
    seed: int = Field(default=0, ge=0, description="Seed; the same seed gives the same matrix in any process.")
    scope: Literal["per_tensor", "proportional", "flat"] = Field(default="per_tensor", description="'per_tensor': each tensor to dim; 'proportional': dim shared by tensor size (multiples of 512); 'flat': all tensors together to dim.")
    factors: tuple[int, int] | None = Field(default=None, description="For kind 'kronecker': (k_out, k_in), the dimensions the output and input sides are projected to; dim must be their product. Omitted: both sqrt(dim).")

    def kronecker_factors(self) -> tuple[int, int]:
        """(k_out, k_in) of a Kronecker projection, or one clear error."""
        if self.factors is not None:
            k_out, k_in = self.factors
            if k_out < 1 or k_in < 1 or k_out * k_in != self.dim:
                raise ProjectionError(f"kronecker factors {list(self.factors)} must be positive with product dim {self.dim}")
            return k_out, k_in
        root = math.isqrt(max(self.dim, 0))
        if root < 1 or root * root != self.dim:
            raise ProjectionError(f"kronecker dim {self.dim} is not a square; give factors=(k_out, k_in) with "
                                  f"k_out * k_in = {self.dim}, or a square dim such as {max(1, root) ** 2} or {(root + 1) ** 2}")
        return root, root

    @property
    def label(self) -> str:
        """The setting in a group name: kind, scope (or factors), dimension, seed."""
        scope = "x".join(map(str, self.kronecker_factors())) if self.kind == "kronecker" else self.scope
        return f"{self.kind}-{scope}-d{self.dim}-s{self.seed}"


def parse_projection(text: str) -> ProjectionSpec:
    """A projection from the command line: ``KIND:SCOPE:DIM[:SEED]`` or ``kronecker:KOUTxKIN[:SEED]``.

    E.g. ``rademacher:flat:8192``, ``gaussian:proportional:16384:1``, ``kronecker:64x64``.
    """
    parts = text.split(":")
    try:
        if parts[0] == "kronecker" and len(parts) in (2, 3):
            k_out, k_in = (int(v) for v in parts[1].split("x"))
            return ProjectionSpec(kind="kronecker", dim=k_out * k_in, factors=(k_out, k_in),
                                  seed=int(parts[2]) if len(parts) == 3 else 0)
        if len(parts) in (3, 4):
            return ProjectionSpec(kind=parts[0], scope=parts[1], dim=int(parts[2]), seed=int(parts[3]) if len(parts) == 4 else 0)
    except (ValueError, ValidationError) as err:
        raise ProjectionError(f"projection {text!r} is not valid: {_first_error(err)}; write KIND:SCOPE:DIM[:SEED] "
                              "(kinds rademacher, gaussian, sparse; scopes per_tensor, proportional, flat) "
                              "or kronecker:KOUTxKIN[:SEED]") from None
    raise ProjectionError(f"projection {text!r} is not valid; write KIND:SCOPE:DIM[:SEED], e.g. 'rademacher:flat:8192', "
                          "or kronecker:KOUTxKIN[:SEED], e.g. 'kronecker:64x64'")


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return str(err)


def check_projection(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The output dimension of every tensor (by its shape), or one clear error; nothing is computed."""
    if spec.dim < 1:
        raise ProjectionError(f"projection dimension {spec.dim} must be at least 1")
    if not shapes:
        raise ProjectionError("no tensor to project")
    if spec.factors is not None and spec.kind != "kronecker":
        raise ProjectionError(f"factors are for kind 'kronecker', not {spec.kind!r}; drop them or use kind 'kronecker'")
    if spec.kind == "kronecker":
        return _check_kronecker(spec, shapes)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    if spec.scope == "per_tensor":
        too_big = {n: s for n, s in sizes.items() if spec.dim > s}
        if too_big:
            name, size = next(iter(too_big.items()))
            raise ProjectionError(
                f"projection dimension {spec.dim} exceeds the size of {len(too_big)} tensors (e.g. {name!r}: {size}); "
                "a projection to more dimensions than the gradient has only adds noise. Use a smaller dim, "
                "select larger tensors, or scope 'proportional'/'flat'")
        return {n: spec.dim for n in sizes}
    if spec.dim > total:
        raise ProjectionError(f"projection dimension {spec.dim} exceeds the gradient size {total}; use at most {total}")
    if spec.scope == "flat":
        return {n: spec.dim for n in sizes}
    if spec.dim < ROUND_TO * len(sizes):
        raise ProjectionError(f"scope 'proportional' gives every tensor a multiple of {ROUND_TO} dimensions; "
                              f"{len(sizes)} tensors need dim >= {ROUND_TO * len(sizes)}, not {spec.dim}")
    return {n: max(ROUND_TO, round(spec.dim * s / total / ROUND_TO) * ROUND_TO) for n, s in sizes.items()}


def _check_kronecker(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    k_out, k_in = spec.kronecker_factors()
    if spec.scope != "per_tensor":
        raise ProjectionError(f"kind 'kronecker' projects each weight matrix on its own: use scope 'per_tensor', not {spec.scope!r}")
    flat = [n for n, s in shapes.items() if len(s) != 2]
    if flat:
        raise ProjectionError(f"kind 'kronecker' needs 2-D weights (linear or embedding layers); {len(flat)} selected tensors are not "
                              f"(e.g. {flat[0]!r} with shape {list(shapes[flat[0]])}); select weights with layers=, e.g. "
                              "'model.layers.*.mlp.*_proj.weight'")
    small = [n for n, (rows, cols) in shapes.items() if k_out > rows or k_in > cols]
    if small:
        rows, cols = shapes[small[0]]
        raise ProjectionError(f"kronecker factors ({k_out}, {k_in}) exceed the (out, in) shape ({rows}, {cols}) of {small[0]!r} "
                              f"and {len(small) - 1} more; use k_out <= out and k_in <= in")
    return {n: spec.dim for n in shapes}


FLAT = "flat"


def output_dims(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Array name -> dimension in the projection's output: one per tensor, or one ``flat``."""
    dims = check_projection(spec, shapes)
    return {FLAT: spec.dim} if spec.scope == "flat" else dims


def output_key(spec: ProjectionSpec, name: str) -> str:
    """The output array a tensor's projection goes to (added to the others' for scope 'flat')."""
    return FLAT if spec.scope == "flat" else name
