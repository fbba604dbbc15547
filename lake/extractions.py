"""Several extractions of one variant: which group an extraction goes to, and which group a reader picks.

A gradient group's name carries the settings that tell extractions of one variant apart (its layer
patterns and stored dtype: ``layout.extraction_settings``).
`group_path` places an extraction by that rule and by the two rules that keep older lakes (a group
at the plain name holding exactly this extraction is reused; the defaults go to ``-default`` where
an older extraction with other settings holds the plain name).  Readers never parse a name:
`describe` reads a group's settings from its attrs and `choose` picks one extraction by name or by
layers, with one error that lists the candidates when the choice is not clear.
"""

from __future__ import annotations

from gradlake.lake import layout
from gradlake.lake.gradient_plan import GradientPlan, fingerprint, read_meta
from gradlake.lake.store import LakeError, LakeStore

PICK = "extraction= (a group's name) or layers= (its layer patterns)"


class AmbiguousExtraction(LakeError):
    """Several extractions match what was asked: the message lists them and says how to pick one."""


def settings_of(meta: dict) -> str:
    """The settings part of the name the group's extraction has today (``layout.extraction_settings``), from its attrs."""
    lineage, plan = meta.get("lineage", {}), meta.get("plan", {})
    return layout.extraction_settings(lineage.get("layer_patterns") or [], plan.get("dtype", layout.DEFAULT_DTYPE))


def describe(path: str, meta: dict) -> dict:
    """A gradient group's extraction as readers pick it: its name, settings, layers, dtype and what it holds.

    For a projection group, `extraction` names the gradient group it was made from (its settings are that one's)."""
    lineage, plan = meta.get("lineage", {}), meta.get("plan", {})
    projection = lineage.get("projection") or {}
    source = projection.get("source_group")
    kept = lineage.get("gradients_kept", True) is not False
    return {
        "path": path, "group": path.rsplit("/", 1)[-1],
        "extraction": (source or path).rsplit("/", 1)[-1],
        "settings": None if projection else settings_of(meta),
        "layers": tuple(lineage.get("layer_patterns") or ()),
        "dtype": plan.get("dtype"),
        "kept": kept,
        "holds": "projection" if projection else ("gradients" if kept else "projections only"),
    }


def layers_text(layers: tuple[str, ...] | list[str]) -> str:
    """Layer patterns as a reader sees them: the patterns joined by ' ', or 'every parameter'."""
    return " ".join(layers) if layers else "every parameter"


def label(record: dict) -> str:
    """One extraction in a message: its name and the settings that tell it apart."""
    parts = [f"layers {layers_text(record['layers'])}"]
    if record.get("dtype"):
        parts.append(record["dtype"])
    if not record.get("kept", True):
        parts.append("projections only")
    return f"{record['extraction']} ({', '.join(parts)})"


def group_path(store: LakeStore, directory: str, paradigm: str, mode: str, target: str, settings: str,
               lineage: dict, plan: GradientPlan) -> str:
    """Where this extraction's group is, or goes: by its settings, and by the rules that keep older lakes.

    `directory` is the variant's (``layout.gradients_dir``); `settings` is ``layout.extraction_settings`` of the
    extraction.  A group holding exactly this extraction (same fingerprint) at the plain or the named path is
    it; else the named path (the plain one for the defaults, or ``-default`` where an older extraction with other
    settings holds the plain one).  A group at the returned path with another fingerprint is refused by
    `GradientGroup.check_path`, naming what differs."""
    plain = f"{directory}/{layout.gradient_group_name(paradigm, mode, target)}"
    named = f"{directory}/{layout.gradient_group_name(paradigm, mode, target, settings or layout.LEGACY_TAKEN)}"
    wanted = plain if not settings else named
    held = {}
    for path in (plain, named):
        try:
            held[path] = read_meta(store, path)
        except LakeError:
            if path == wanted:  # an unreadable or outdated group where this one goes: its own clear error
                raise
            held[path] = {}
    ours = fingerprint(lineage, plan)
    for path in (plain, named):
        if held[path].get("fingerprint") == ours:
            return path
    if not settings and held[plain] and settings_of(held[plain]):  # an older extraction with other settings
        return named
    return wanted


def choose(records: list[dict], what: str, extraction: str | None = None, layers: list[str] | None = None,
           how: str = PICK) -> dict:
    """The one record (a `describe` dict) that `extraction` or `layers` pick; one clear error otherwise.

    `extraction` matches a group's name (``sft-store-L1f0c9a2b``) or its settings part (``L1f0c9a2b``); `layers`
    the patterns as given to the extraction ([] for every parameter).  With neither, the only one."""
    hits = [r for r in records
            if (extraction is None or extraction in (r["extraction"], r["group"], r.get("settings")))
            and (layers is None or list(r["layers"]) == list(layers))]
    if len(hits) == 1:
        return hits[0]
    held = "; ".join(label(r) for r in records) or "none"
    asked = ", ".join(f"{k} {v!r}" for k, v in (("extraction", extraction), ("layers", layers)) if v is not None)
    if not hits:
        raise LakeError(f"no {what}{' with ' + asked if asked else ''}; the lake holds {held}")
    raise AmbiguousExtraction(f"{len(hits)} extractions match for {what}{' with ' + asked if asked else ''}: "
                              f"{'; '.join(label(r) for r in hits)}; pick one with {how}")


def extractions_in(store: LakeStore, directory: str, stem: str) -> list[dict]:
    """Every per-sample ('store' mode) gradient group of `stem` in a variant's directory, as `describe` gives it."""
    records = []
    for meta_path in store.glob(f"{directory}/{layout.gradient_group_name(stem, 'store')}*/zarr.json"):
        path = f"{directory}/{meta_path.rsplit('/', 2)[-2]}"  # glob gives the store's own paths
        meta = read_meta(store, path)
        lineage = meta.get("lineage") or {}
        if meta and not lineage.get("projection") and layout.stem(lineage.get("paradigm", ""), lineage.get("target", "parameters")) == stem:
            records.append(describe(path, meta))
    return records


def extraction_pair(store: LakeStore, first_dir: str, second_dir: str, stem: str, labels: tuple[str, str],
                    extraction: str | None = None, layers: list[str] | None = None, how: str = PICK) -> tuple[str, str]:
    """The groups of one extraction in two variants' directories (originals and queries, training samples and
    queries): the one extraction both hold with the same settings, or the one `extraction` (a group's name or
    settings) or `layers` pick; one clear error listing them otherwise.  `labels` name the two variants."""
    found = [extractions_in(store, d, stem) for d in (first_dir, second_dir)]
    for directory, records, name in zip((first_dir, second_dir), found, labels):
        if not records:
            raise LakeError(f"no group at {directory}/{stem}-store (nor another extraction of {name!r}) in {store.url}; "
                            f"extract {name!r} first")
    second = {r["settings"]: r for r in found[1]}
    pairs = [{**r, "other": second[r["settings"]]} for r in found[0] if r["settings"] in second]
    if not pairs and len(found[0]) == len(found[1]) == 1 and extraction is None and layers is None:
        return found[0][0]["path"], found[1][0]["path"]  # one each: the caller's checks say what differs, tensor by tensor
    if not pairs:
        raise LakeError(f"no extraction is held for both {labels[0]!r} and {labels[1]!r} with the same layers and "
                        f"dtype: {labels[0]!r} has {'; '.join(map(label, found[0]))}, {labels[1]!r} has "
                        f"{'; '.join(map(label, found[1]))}; extract {labels[1]!r} with the settings of {labels[0]!r}")
    chosen = choose(pairs, f"{labels[0]!r} and {labels[1]!r} in {store.url}/{first_dir.rsplit('/', 1)[0]}",
                    extraction, layers, how)
    return chosen["path"], chosen["other"]["path"]
