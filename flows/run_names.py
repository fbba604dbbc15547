"""Flow run names a person can tell apart: the model and checkpoint under study first, as the lake keys them.

Prefect calls a flow's `flow_run_name` for every run, even one whose name a person typed into the
run form or passed as `run_deployment(..., flow_run_name=...)`.  `named_by_model` therefore keeps a
run's name unless Prefect made it up: the server's slug for a run created without a name
('cobalt-stingray', coolname's adjective and animal) or the name the UI's run form fills in before
anyone types ('Sleek-Addax' in the V2 UI, 'gamma2-joule' in the V1 UI).
"""

from __future__ import annotations

import functools
import re
from typing import Callable

from prefect import runtime
from pydantic import BaseModel

from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.model import ModelSpec

# The run forms' own name generators (Prefect 3.8's UI bundles): V2 joins one of these adjectives
# (faker's product adjectives) and an animal of at most six letters; V1 a Greek letter, perhaps
# numbered, and one to three lowercase words (a constellation, a scientist, ...).
_V2_FORM = re.compile(r"(Awesome|Rustic|Small|Gorgeous|Fantastic|Sleek|Intelligent|Unbranded|Refined|Licensed|Generic"
                      r"|Practical|Ergonomic|Handcrafted|Tasty|Handmade|Incredible)-[A-Z][A-Za-z ]{0,5}")
_V1_FORM = re.compile(r"(alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi|rho|sigma"
                      r"|tau|upsilon|phi|chi|psi|omega)\d*(-[a-z]+){1,4}")


@functools.cache
def _server_words() -> tuple[frozenset[str], ...]:
    """The adjectives and the animals of the server's two-word slugs (coolname's list '2': adjective, animal)."""
    try:
        from coolname.data import config
    except ImportError:
        return ()

    def words(name: str) -> frozenset[str]:
        entry = config[name]
        return frozenset(entry.get("words", ())).union(*(words(n) for n in entry.get("lists", ())))

    try:
        return tuple(words(name) for name in config["an"]["lists"])
    except KeyError:  # another coolname layout: no server name is recognised, so every name is kept
        return ()


def prefect_made_up(name: str | None) -> bool:
    """Whether a flow run's name is one Prefect picked because nobody named the run (the server or the run form)."""
    if not name:
        return True
    if _V2_FORM.fullmatch(name) or _V1_FORM.fullmatch(name):
        return True
    words, parts = _server_words(), name.split("-")
    return bool(words) and len(parts) == len(words) and all(p in w for p, w in zip(parts, words))


def run_label(model: ModelSpec, what: str) -> str:
    """'<model key>@<checkpoint key> <what>', e.g. 'tiny-olmo2-b5d6f1a0@checkpoint-1 paraphrased shards 3'."""
    model_key, checkpoint_key = lake_keys(model)
    return f"{model_key}@{checkpoint_key} {what}"


def named_by(spec_class: type[BaseModel], label: Callable, fallback: str) -> Callable[[], str]:
    """A `flow_run_name` for a flow whose one parameter is `spec`: label(spec), unless the run already has a name a
    person gave it, which is kept."""

    def name() -> str:
        given = runtime.flow_run.name
        if not prefect_made_up(given):
            return given
        spec = runtime.flow_run.parameters.get("spec")
        try:
            return label(spec if isinstance(spec, spec_class) else spec_class.model_validate(spec))
        except Exception:  # a bad spec fails in the flow with its own message; the name is not the place
            return fallback

    return name


def named_by_model(spec_class: type[BaseModel], describe: Callable, fallback: str) -> Callable[[], str]:
    """A `flow_run_name` for a flow whose `spec` has a `model`: run_label(spec.model, describe(spec)), unless named."""
    return named_by(spec_class, lambda spec: run_label(spec.model, describe(spec)), fallback)
