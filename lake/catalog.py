"""The analyst's view of a lake: one catalog, gradients as xarray, datasets as pandas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from gradlake.lake import layout
from gradlake.lake.datasets import list_datasets, read_dataset
from gradlake.lake.dtypes import DTYPE_ATTR, is_bfloat16
from gradlake.lake.evaluations import list_attribution_benchmarks, list_evaluations, list_tracing, read_evaluation
from gradlake.lake.extractions import AmbiguousExtraction, describe, layers_text
from gradlake.lake.extractions import label as extraction_label
from gradlake.lake.gradient_plan import ATTR
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import read_checked
from gradlake.lake.results import read_checked_file, read_parquet_bytes, read_result_table
from gradlake.lake.scores import list_score_groups
from gradlake.lake.lookup import (GENERATED, LOOKUP_KEYS, PROJECTION_KEYS, checkpoint_lookup_key, generated_variants,
                                  lookup_keys, matches, model_keys, resolve, some_of, tell_apart)
from gradlake.lake.store import LakeError, LakeStore, scan_json


class Lake:
    """A gradlake lake opened for reading."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.store = LakeStore(url, storage_options or {})

    @property
    def url(self) -> str:
        return self.store.url

    def _gradient_groups(self, damaged: list | None = None) -> list[tuple[str, dict]]:
        """(path, attrs) of every gradient and projection group; those whose metadata is damaged go to `damaged`."""
        groups = []
        for path, record, damage in scan_json(self.store, f"{layout.GRADIENT_GROUPS}/zarr.json"):
            attrs = (record or {}).get("attributes", {}).get(ATTR)
            if damage is not None and damaged is not None:
                damaged.append((path, damage))
            elif attrs:  # a group still being created has no attrs yet
                groups.append((path, attrs))
        return groups

    def _gradient_records(self) -> list[dict]:
        """What a lookup filters on, per gradient or projection group; model and checkpoint as their lake keys,
        the extraction as `lake.extractions.describe` reads it."""
        records = []
        for path, attrs in self._gradient_groups():
            lineage, projection = attrs["lineage"], attrs["lineage"].get("projection") or {}
            _, model, checkpoint, *_ = path.split("/")
            records.append({**describe(path, attrs), **lookup_keys(lineage), "model": model, "checkpoint": checkpoint,
                            "projection": _projection_label(projection), **{k: projection.get(k) for k in PROJECTION_KEYS}})
        return records

    def catalog(self) -> pd.DataFrame:
        """Everything in the lake, one row per gradient group or dataset variant, with lineage and completeness."""
        try:
            with self.store.explained_errors():
                rows = self._catalog_rows()
        except LakeError as err:  # raised here afresh: the user's traceback ends at this call, not in the scan
            raise type(err)(str(err)) from None
        if not rows:
            self.store.check_exists()  # an empty table for a lake that is not there would say nothing
        columns = ["kind", "path", "model", "model_id", *LOOKUP_KEYS[1:], "group", "extraction", "layers", "holds",
                   "projection", "n_samples", "n_parameters", "numel", "dtype", "chunks_done", "chunks_total", "complete",
                   "damaged"]
        frame = pd.DataFrame(rows)
        return frame.reindex(columns=columns + sorted(c for c in frame.columns if c not in columns))

    def _catalog_rows(self) -> list[dict]:
        rows, damaged = [], []
        for path, attrs in self._gradient_groups(damaged):
            lineage, plan = attrs["lineage"], attrs["plan"]
            try:
                flags = zarr.open_array(self.store.zarr_store, path=f"{path}/shard_complete", mode="r")[:]
            except (ValueError, KeyError, FileNotFoundError) as err:  # damaged flags: listed, not fatal
                damaged.append((path, f"its completion flags cannot be read ({type(err).__name__}: {err})"))
                continue
            about = describe(path, attrs)
            _, model_key, checkpoint_key, *_ = path.split("/")
            rows.append({
                "kind": "gradients", "path": path,
                **lookup_keys(lineage), "model": model_key, "model_id": lineage.get("model"), "checkpoint": checkpoint_key,
                "group": about["group"], "extraction": about["extraction"], "layers": layers_text(about["layers"]),
                "holds": about["holds"],
                "n_samples": plan["n_samples"], "n_parameters": len(plan["parameters"]),
                "numel": sum(math.prod(shape) for shape in plan["parameters"].values()),
                "dtype": plan["dtype"], "chunks_done": int(flags.sum()), "chunks_total": len(flags),
                "complete": bool(flags.all()) and (plan["mode"] == "store" or bool(attrs.get("complete"))),
                "projection": _projection_label(lineage.get("projection")),
                **{f"lineage.{k}": v for k, v in lineage.items() if k not in LOOKUP_KEYS},
            })
        for path, damage in damaged:
            _, model_key, checkpoint_key, *_ = path.split("/")
            rows.append({"kind": "gradients", "path": path, "model": model_key, "checkpoint": checkpoint_key,
                         "complete": False, "damaged": damage})
        broken: dict[str, list] = {"evaluation": [], "tracing": [], "attribution": []}  # damaged meta.json: shown
        for path, meta in list_evaluations(self.store, broken["evaluation"]):
            lineage = meta["lineage"]
            _, model_key, checkpoint_key, *_ = path.split("/")
            rows.append({
                "kind": "evaluation", "path": path, "model": model_key, "model_id": lineage.get("model"),
                "checkpoint": checkpoint_key, "dataset": lineage.get("dataset"),
                "variant": ",".join(lineage.get("queries", {})), "paradigm": lineage.get("paradigm"), "complete": True,
                "extraction": _evaluated_extraction(lineage),
                "layers": layers_text(lineage["layer_patterns"]) if lineage.get("layer_patterns") is not None else None,
                "target": (lineage.get("settings") or {}).get("target", "parameters"),
                **{f"lineage.{k}": v for k, v in lineage.items() if k not in LOOKUP_KEYS},
            })
        for path, meta in list_tracing(self.store, broken["tracing"]):
            _, base_key, base_checkpoint, model_key, checkpoint_key = path.split("/")
            lineage = meta.get("lineage", {})
            rows.append({
                "kind": "tracing", "path": path, "model": model_key, "model_id": _model_id(lineage.get("candidate")),
                "checkpoint": checkpoint_key,
                "dataset": lineage.get("dataset"), "variant": lineage.get("variant"), "complete": True,
                "lineage.base": base_key, "lineage.base_checkpoint": base_checkpoint, "verdict": meta.get("verdict"),
                "p_value": (meta.get("summary") or {}).get("p_value"),
            })
        for path, meta in list_attribution_benchmarks(self.store, broken["attribution"]):
            where = layout.parse_benchmark_dir(path)
            rows.append({
                "kind": "attribution", "path": path, "model": where["model"], "model_id": _model_id(meta.get("model")),
                "checkpoint": where["checkpoint"],
                "dataset": where["dataset"], "variant": where["queries"], "n_samples": meta.get("n_train"), "complete": True,
                **{f"lineage.{k}": v for k, v in meta.items() if k not in ("model", "queries", "query_ids", "best_tensor")},
            })
        for kind, hits in broken.items():  # a row saying so, never dropped: a reader of it names the file too
            for path, damage in hits:
                parts = path.split("/")
                rows.append({"kind": kind, "path": path, "model": parts[3 if kind == "tracing" else 1],
                             "checkpoint": parts[4 if kind == "tracing" else 2], "complete": False, "damaged": damage})
        for group in list_score_groups(self.store):
            _, model_key, checkpoint_key, dataset_name, query_set, _ = group["path"].split("/")
            rows.append({
                "kind": "scores", "path": group["path"], "model": model_key,
                "model_id": _model_id((group.get("lineage") or {}).get("model")), "checkpoint": checkpoint_key,
                "dataset": dataset_name, "variant": query_set.split(".", 1)[-1], "complete": bool(group.get("complete")),
                "damaged": group.get("damaged"),
                "lineage.method": group.get("method"), "lineage.compute_seconds": group.get("compute_seconds"),
            })
        for meta in list_datasets(self.store):
            if meta.get("damaged"):
                rows.append({"kind": "dataset", "path": meta["path"].rsplit("/", 1)[0], "dataset": meta["dataset"],
                             "variant": meta["variant"], "complete": False, "damaged": meta["damaged"]})
                continue
            rows.append({
                "kind": "dataset", "path": layout.dataset_version_dir(meta["dataset"], meta["variant"], meta["version"]),
                "dataset": meta["dataset"], "variant": meta["variant"], "n_samples": meta["n_samples"],
                "complete": True, "lineage.version": meta["version"], "lineage.content_hash": meta["content_hash"],
                "lineage.created_at": meta["created_at"],
                **{f"lineage.{k}": v for k, v in meta.get("lineage", {}).items()},
            })
        return rows

    def find_gradients(self, projection: dict | None = None, extraction: str | None = None,
                       layers: list[str] | None = None, **where) -> str:
        """The path of the one gradient group (or, with `projection`, projection group) matching the filters.

        Filters are read by `resolve`: a model by key, id or path, ``variant="model_generated"`` for its own answers.
        Where a variant holds several extractions, `extraction` (a gradient group's name, as the catalog's
        ``extraction`` column lists it, or its settings part) or `layers` (the layer patterns as given) picks one.
        """
        unknown = (set(where) - set(LOOKUP_KEYS)) | (set(projection or {}) - set(PROJECTION_KEYS))
        if unknown:
            raise LakeError(f"cannot select gradients by {sorted(unknown)}; use {list(LOOKUP_KEYS)}, extraction and layers "
                            f"(and {list(PROJECTION_KEYS)} for projections)")
        with self.store.explained_errors():
            records = [r for r in self._gradient_records() if (r["projection"] is not None) == (projection is not None)]
        filters = {**where, **(projection or {})}
        accepted = resolve(filters, generated_variants(r["variant"] for r in records))
        hits = [r for r in records if matches(r, accepted)]
        picked = [r for r in hits if (extraction is None or extraction in (r["extraction"], r["group"], r["settings"]))
                  and (layers is None or list(r["layers"]) == list(layers))]
        if len(picked) == 1:
            return picked[0]["path"]
        asked = {k: v for k, v in {**filters, "extraction": extraction, "layers": layers}.items() if v is not None}
        what = "gradient group" if projection is None else "projection group"
        if not picked:
            if not records:
                self.store.check_exists()
            shown = (*LOOKUP_KEYS, "extraction", *(("projection",) if projection is not None else ()))
            held = sorted({tuple(r[k] for k in shown) for r in records}, key=str)
            raise LakeError(f"no {what} in {self.url} matches {asked}; the lake holds "
                            f"{some_of(held, joiner=', ') if held else 'none'} as {list(shown)}")
        apart = tell_apart(picked, (*LOOKUP_KEYS, *PROJECTION_KEYS))
        if apart.startswith("their paths") and len({r["extraction"] for r in picked}) > 1:
            raise AmbiguousExtraction(
                f"{len(picked)} extractions hold {what}s matching {asked} in {self.url}: "
                f"{'; '.join(extraction_label(r) for r in picked)}; pick one with extraction=NAME (a name above) "
                "or layers=[PATTERN, ...] (as given to the extraction)")
        raise LakeError(f"{len(picked)} {what}s match {asked} in {self.url}; tell them apart with "
                        f"{tell_apart(picked, (*LOOKUP_KEYS, 'extraction', *PROJECTION_KEYS))}")

    def gradients(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                  variant: str | None = None, paradigm: str | None = None, mode: str | None = None,
                  target: str | None = None, extraction: str | None = None,
                  layers: list[str] | None = None) -> xr.Dataset:
        """A gradient group as an xarray.Dataset: one variable per parameter tensor (or ``inputs_embeds``), coordinate
        ``sample``.  `target`: 'parameters', 'inputs_embeds' or 'inputs_embeds_mean', where a lake holds several;
        `extraction` (a group's name) or `layers` (its layer patterns), where a variant holds several extractions.

        A group whose gradients were not kept (``keep_gradients`` off: only its projections are stored) is one clear
        error naming where its projections are."""
        path = self.find_gradients(model=model, checkpoint=checkpoint, dataset=dataset, variant=variant,
                                   paradigm=paradigm, mode=mode, target=target, extraction=extraction, layers=layers)
        with self.store.explained_errors():
            record = next(r for r in self._gradient_records() if r["path"] == path)
            if not record["kept"]:
                made = sorted(r for r in self._gradient_records() if r["projection"] and r["extraction"] == record["group"]
                              and r["path"].rsplit("/", 1)[0] == path.rsplit("/", 1)[0])
                where = ", ".join(f"{r['path']} ({r['projection']})" for r in made) or "none is in the lake"
                raise LakeError(f"the gradient group {path} holds no gradients: its extraction ran with keep_gradients off "
                                f"and kept only their projections ({where}); read those with lake.projections(..., "
                                f"extraction={record['group']!r}, kind=, dim=), or extract again with keep_gradients on")
        return self._open_group(path)

    def _open_group(self, path: str) -> xr.Dataset:
        """A group as xarray, every array read lazily through `read_checked` (bfloat16 as float32).

        The sample ids and token counts are checked whole against the digests recorded when the group was made;
        a damaged chunk object of any other array is one LakeError naming it when it is read."""
        with self.store.explained_errors():
            checked = GradientGroup.open(self.store, path)
            for name in ("sample", "n_tokens"):  # small: proven on every open (input_ids: by `gradlake verify`)
                checked.tokens(name)
            ds = xr.open_zarr(self.store.zarr_store, group=path, consolidated=False, zarr_format=3)
            group = zarr.open_group(self.store.zarr_store, path=path, mode="r", zarr_format=3)
            for name, var in list(ds.data_vars.items()):
                attrs = {k: v for k, v in var.attrs.items() if k != DTYPE_ATTR}
                if is_bfloat16(group[name]):
                    attrs["stored_as"] = "bfloat16"
                ds[name] = xr.Variable(var.dims, indexing.LazilyIndexedArray(_Checked(group[name])), attrs)
            return ds

    def projections(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                    variant: str | None = None, paradigm: str | None = None, kind: str | None = None,
                    dim: int | None = None, seed: int | None = None, scope: str | None = None,
                    target: str | None = None, extraction: str | None = None,
                    layers: list[str] | None = None) -> xr.Dataset:
        """A projection group as an xarray.Dataset: one variable per tensor (or ``flat``), coordinate ``sample``.

        `extraction` names the gradient group the projections were made from (or `layers` its layer patterns)."""
        path = self.find_gradients(model=model, checkpoint=checkpoint, dataset=dataset, variant=variant,
                                   paradigm=paradigm, target=target, extraction=extraction, layers=layers,
                                   projection={"kind": kind, "dim": dim, "seed": seed, "scope": scope})
        return self._open_group(path)

    def evaluation(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                   paradigm: str | None = None, table: str = "results", extraction: str | None = None) -> pd.DataFrame:
        """A select-vs-project evaluation's table (``results``, ``self_similarity`` or ``greedy``) as a DataFrame.

        `paradigm` is the directory's name without the extraction's settings (``sft``, ``sft-thesis``,
        ``sft-inputs_embeds``); `extraction` the evaluated extraction (the catalog's ``extraction`` column)."""
        records, damaged = [], []
        with self.store.explained_errors():
            evaluations = list_evaluations(self.store, damaged)
        for path, meta in evaluations:
            _, model_key, checkpoint_key, dataset_name, name = path.split("/")
            named = _evaluated_extraction(meta.get("lineage") or {})
            settings = (named or "").partition("-store-")[2]
            records.append({"path": path, "model": model_key, "checkpoint": checkpoint_key, "dataset": dataset_name,
                            "paradigm": name.replace(f"-{settings}", "", 1) if settings else name, "extraction": named})
        where = {"model": model, "checkpoint": checkpoint, "dataset": dataset, "paradigm": paradigm, "extraction": extraction}
        path = self._one(records, where, "evaluation", damaged)
        with self.store.explained_errors():
            return read_evaluation(self.store, path, table)

    def _one(self, records: list[dict], where: dict, what: str, damaged: list = ()) -> str:
        """The path of the one record matching `where`; else an error listing what the lake holds or what separates the hits."""
        hits = [r for r in records if matches(r, resolve(where))]
        if len(hits) == 1:
            return hits[0]["path"]
        asked = {k: v for k, v in where.items() if v is not None}
        if not hits:
            if not records:
                self.store.check_exists()
            raise LakeError(f"no {what} in {self.url} matches {asked}; the lake holds "
                            f"{some_of([r['path'] for r in records], joiner=', ') or 'none'}" + _damaged_text(damaged))
        raise LakeError(f"{len(hits)} {what}s match {asked} in {self.url}; tell them apart with "
                        f"{tell_apart(hits, where)}")

    def attribution(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                    queries: str | None = None, table: str = "benchmark") -> pd.DataFrame:
        """An attribution benchmark's table (``benchmark``: one row per method; ``lds_per_query``) as a DataFrame."""
        if table not in ("benchmark", "lds_per_query"):
            raise LakeError(f"attribution table {table!r} is not known; use 'benchmark' or 'lds_per_query'")
        damaged = []
        with self.store.explained_errors():
            found = list_attribution_benchmarks(self.store, damaged)
        records = [{"path": path, **layout.parse_benchmark_dir(path)} for path, _ in found]
        where = {"model": model, "checkpoint": checkpoint, "dataset": dataset, "queries": queries}
        path = self._one(records, where, "attribution benchmark", damaged)
        return read_result_table(self.store, path, table, what="attribution benchmark")

    def tracing(self, base: str | None = None, candidate: str | None = None, base_checkpoint: str | None = None,
                candidate_checkpoint: str | None = None, table: str = "results") -> pd.DataFrame:
        """A model-tracing result's table: ``results`` (one row per statistic, unaligned and aligned, with p-values),
        ``path`` (the loss along the interpolation path) or ``tensors`` (each tensor's cosine)."""
        if table not in ("results", "path", "tensors"):
            raise LakeError(f"tracing table {table!r} is not known; use 'results', 'path' or 'tensors'")
        damaged = []
        with self.store.explained_errors():
            found = list_tracing(self.store, damaged)
        records = []
        for path, _ in found:
            _, base_key, base_ckpt, candidate_key, candidate_ckpt = path.split("/")
            records.append({"path": path, "base": base_key, "base_checkpoint": base_ckpt, "candidate": candidate_key,
                            "candidate_checkpoint": candidate_ckpt})
        accepted = {}
        for role, model, checkpoint in (("base", base, base_checkpoint), ("candidate", candidate, candidate_checkpoint)):
            if model is not None:
                accepted[role] = model_keys(model)
            if checkpoint is not None:
                accepted[f"{role}_checkpoint"] = {checkpoint_lookup_key(checkpoint)}
        hits = [r for r in records if all(r[k] in values for k, values in accepted.items())]
        asked = {k: v for k, v in {"base": base, "candidate": candidate, "base_checkpoint": base_checkpoint,
                                   "candidate_checkpoint": candidate_checkpoint}.items() if v is not None}
        if not hits:
            if not records:
                self.store.check_exists()
            raise LakeError(f"no tracing result in {self.url} matches {asked}; the lake holds "
                            f"{[r['path'] for r in records] or 'none'}" + _damaged_text(damaged))
        if len(hits) > 1:
            raise LakeError(f"{len(hits)} tracing results match {asked} in {self.url}; tell them apart with "
                            f"{tell_apart(hits, ('base', 'base_checkpoint', 'candidate', 'candidate_checkpoint'))}")
        return read_result_table(self.store, hits[0]["path"], table, what="tracing result")

    def tracing_summary(self, base: str, base_checkpoint: str | None = None) -> pd.DataFrame:
        """The summary of every candidate traced against a base (written by trace-many): verdicts, p-values, statistics."""
        keys = model_keys(base)
        with self.store.explained_errors():
            found = self.store.glob(f"{layout.TRACING_BASES}/summary.parquet")
        hits = []
        for path in found:
            base_key, checkpoint_key = path.split("/")[-3:-1]
            if base_key in keys and (base_checkpoint is None or checkpoint_key == checkpoint_lookup_key(base_checkpoint)):
                hits.append(path)
        if len(hits) != 1:
            raise LakeError(f"{len(hits)} tracing summaries match base {base!r} checkpoint {base_checkpoint!r} in "
                            f"{self.url}" + ("; give base_checkpoint" if hits else "; run trace-many first"))
        directory = hits[0][len(self.store.root) + 1:].rsplit("/", 1)[0]  # checked against its manifest (trace-many)
        raw = read_checked_file(self.store, directory, "summary.parquet")
        return read_parquet_bytes(self.store, f"{directory}/summary.parquet", raw)

    def scores(self, method: str, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
               queries: str | None = None) -> xr.DataArray:
        """One method's scores (queries x training samples) with the sample ids as coordinates.

        Both coordinates are sample ids as every other reader gives them (``probe-0004``: the dataset's ``id``, the
        gradients' ``sample``); the score group keeps the training samples as ``<variant>:<id>``
        (``original:probe-0004``), given as the coordinate ``train_key`` beside ``train``."""
        from gradlake.lake.scores import ScoreGroup

        with self.store.explained_errors():
            groups = list_score_groups(self.store)
        records = []
        for group in groups:
            _, model_key, checkpoint_key, dataset_name, query_set, _ = group["path"].split("/")
            records.append({"path": group["path"], "model": model_key, "checkpoint": checkpoint_key,
                            "dataset": dataset_name, "variant": query_set.split(".", 1)[-1], "method": group.get("method")})
        methods = sorted({r["method"] for r in records})
        if records and method not in methods:
            raise LakeError(f"no scores of method {method!r} in {self.url}; its methods are {methods}")
        where = {"model": model, "checkpoint": checkpoint, "dataset": dataset, "variant": queries}
        path = self._one([r for r in records if r["method"] == method], where, f"{method!r} score group")
        with self.store.explained_errors():
            group = ScoreGroup.open(self.store, path)
            keys = group.train_ids()
            return xr.DataArray(group.read(), dims=("query", "train"), name=method,
                                coords={"query": group.query_ids(), "train": [k.split(":", 1)[-1] for k in keys],
                                        "train_key": ("train", keys)}, attrs=group.meta)

    def dataset(self, name: str, variant: str = "original", model: str | None = None,
                checkpoint: str | None = None, version: str | None = None) -> pd.DataFrame:
        """A dataset variant as a DataFrame (``id``, ``messages``), its latest version unless one is named.

        ``variant="model_generated"`` with `model` and `checkpoint` (read as by `resolve`) names that model's
        answers; the full name ``model_generated.<model key>.<checkpoint key>`` works too.
        """
        with self.store.explained_errors():
            if variant != GENERATED:
                return read_dataset(self.store, name, variant, version)
            held = generated_variants(m["variant"] for m in list_datasets(self.store) if m["dataset"] == name)
            accepted = resolve({"model": model, "checkpoint": checkpoint, "variant": variant}, held)["variant"]
            hits = [v for v in held if v in accepted]
            if len(hits) != 1:
                raise LakeError(f"dataset {name!r} in {self.url} has {len(hits) or 'no'} {GENERATED} variant"
                                f"{'s' if len(hits) > 1 else ''} of model {model!r} at checkpoint {checkpoint!r}; "
                                f"its generated variants are {held or 'none'}")
            return read_dataset(self.store, name, hits[0], version)


class _Checked(BackendArray):
    """A Zarr array read by xarray on demand through `read_checked`: a damaged chunk object is one LakeError
    naming it; bfloat16 bits come back as float32 (exact); a missing gradient chunk reads as NaN."""

    def __init__(self, array: zarr.Array):
        self.array, self.shape = array, array.shape
        self.dtype = np.dtype(np.float32) if is_bfloat16(array) else np.dtype(array.dtype)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC,
                                                  lambda k: read_checked(self.array, k, nan_ok=True))


def _evaluated_extraction(lineage: dict) -> str | None:
    """The name of the originals' gradient group an evaluation compared (recorded since names carry settings)."""
    original = (lineage.get("gradient_groups") or {}).get("original")
    return lineage.get("extraction") or (original.rsplit("/", 1)[-1] if original else None)


def _damaged_text(damaged: list) -> str:
    """What a reader's "no such result" adds about results left out because their meta.json is damaged."""
    return "".join(f"; damaged, so not listed: {reason}" for _, reason in damaged)


def _model_id(value: object) -> str | None:
    """A model's id or path as a result recorded it (a ModelSpec's dump, or the text itself)."""
    if isinstance(value, dict):
        value = value.get("model")
    return value if isinstance(value, str) else None


def _projection_label(projection: dict | None) -> str | None:
    if not projection:
        return None
    return f"{projection['kind']}/{projection['scope']}/d{projection['dim']}/s{projection['seed']}"


def open_lake(url: str, storage_options: dict | None = None) -> Lake:
    """Open a lake at an fsspec URL (``file:///...``, a path, or ``s3://bucket/prefix``)."""
    return Lake(url, storage_options)
