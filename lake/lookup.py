"""How a lookup of the lake reads its filters: a model by its key, id or path; a checkpoint by name or key.

Every reader of ``lake.catalog`` (gradients, projections, evaluations, attribution, tracing, datasets)
matches records by this one rule, so that a filter that finds a result in one kind finds it in all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from gradlake.lake import layout
from gradlake.lake.store import LakeError

LOOKUP_KEYS = ("model", "checkpoint", "dataset", "variant", "paradigm", "target", "mode")


def lookup_keys(lineage: dict) -> dict:
    """A group's lookup keys from its lineage; the target is recorded only when not the weights."""
    return {k: lineage.get(k) for k in LOOKUP_KEYS} | {"target": lineage.get("target", "parameters")}


PROJECTION_KEYS = ("kind", "dim", "seed", "scope")
GENERATED = "model_generated"  # short for the asked model's own answers at the asked checkpoint


def model_keys(model: str) -> set[str]:
    """The lake keys a model may be asked for by: its key itself, its hub id, or its local path (as given or absolute)."""
    text = model.rstrip("/") or model
    keys = {text}
    with contextlib.suppress(ValueError):  # text that makes no key can only be a key as given
        keys.add(layout.key(text))
        keys.add(layout.model_key(os.path.abspath(os.path.expanduser(text)), local=True))
    return keys


def checkpoint_lookup_key(checkpoint: object) -> str | None:
    """A checkpoint's lake key, or None for a value that makes no key."""
    try:
        return layout.key(str(checkpoint))
    except ValueError:
        return None


def resolve(where: dict, generated: Iterable[str] = ()) -> dict[str, set]:
    """The one rule every lookup reads its filters by: the accepted values of each filter given.

    A model matches by its lake key, hub id or local path (as given or absolute), as the extraction
    keyed it (``layout.model_key``); a checkpoint by its name or key; variant ``model_generated`` stands
    for ``model_generated.<model key>.<checkpoint key>`` of the model and checkpoint asked for, so it
    needs both.  `generated` (the lake's generated variants) is named in that error.
    """
    accepted = {k: {v} for k, v in where.items() if v is not None}
    if "model" in accepted:
        accepted["model"] = model_keys(where["model"])
    if "checkpoint" in accepted:
        accepted["checkpoint"] = {checkpoint_lookup_key(where["checkpoint"])}
    if where.get("variant") == GENERATED:
        if where.get("model") is None or where.get("checkpoint") is None:
            held = ", ".join(repr(v) for v in sorted(set(generated))) or "the lake holds none"
            raise LakeError(f"variant {GENERATED!r} means one model's own answers at one checkpoint; pass model= and "
                            f"checkpoint= with it, or the variant's full name ({held})")
        accepted["variant"] = {layout.generated_variant(m, c) for m in accepted["model"] for c in accepted["checkpoint"]}
    return accepted


def matches(record: dict, accepted: dict[str, set]) -> bool:
    """Whether a record's lookup keys are among the accepted values (see `resolve`)."""
    return all((checkpoint_lookup_key(record.get(k)) if k == "checkpoint" else record.get(k)) in values
               for k, values in accepted.items())


SHOWN = 6  # values named in a message; a lake of thousands of groups would otherwise fill the screen


def some_of(values: list, shown: int = SHOWN, joiner: str = " or ") -> str:
    """Values as repr, joined; past `shown` of them the first few, the last and how many in all."""
    texts = [repr(v) for v in values]
    if len(texts) > shown:
        texts = texts[:shown - 1] + [f"... ({len(texts) - shown} more)", texts[-1]]
    return joiner.join(texts)


def tell_apart(hits: list[dict], filters: Iterable[str]) -> str:
    """The filters whose values differ between the hits, with (some of) those values: what would pick one of them."""
    parts = []
    for name in filters:
        values = sorted({h.get(name) for h in hits}, key=str)
        if len(values) > 1:
            parts.append(f"{name}=" + some_of(values))
    return "; ".join(parts) or f"their paths {some_of([h['path'] for h in hits], joiner=', ')}"


def generated_variants(variants: Iterable[str]) -> list[str]:
    """The model-generated variants among these variant names."""
    return [v for v in variants if str(v).startswith(GENERATED + ".")]
