"""The analyst's view of a lake: one catalog, gradients as xarray, datasets as pandas."""

from __future__ import annotations

import json
import math

import pandas as pd
import xarray as xr
import zarr

from gradlake.lake import layout
from gradlake.lake.datasets import list_datasets, read_dataset
from gradlake.lake.evaluations import list_evaluations, read_evaluation
from gradlake.lake.gradients import ATTR
from gradlake.lake.store import LakeError, LakeStore

_KEYS = ("model", "checkpoint", "dataset", "variant", "paradigm", "mode")


class Lake:
    """A gradlake lake opened for reading."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.store = LakeStore(url, storage_options or {})

    @property
    def url(self) -> str:
        return self.store.url

    def _gradient_groups(self) -> list[tuple[str, dict]]:
        fs = self.store.fs
        groups = []
        for meta_path in self.store.glob("gradients/*/*/*/*/*/zarr.json"):
            attrs = json.loads(fs.cat_file(meta_path)).get("attributes", {}).get(ATTR)
            if attrs:  # a group still being created has no attrs yet
                relative = meta_path[len(self.store.root) + 1: -len("/zarr.json")]
                groups.append((relative, attrs))
        return groups

    def catalog(self) -> pd.DataFrame:
        """Everything in the lake, one row per gradient group or dataset variant, with lineage and completeness."""
        rows = []
        for path, attrs in self._gradient_groups():
            lineage, plan = attrs["lineage"], attrs["plan"]
            flags = zarr.open_array(self.store.zarr_store, path=f"{path}/shard_complete", mode="r")[:]
            rows.append({
                "kind": "gradients", "path": path,
                **{k: lineage.get(k) for k in _KEYS},
                "n_samples": plan["n_samples"], "n_parameters": len(plan["parameters"]),
                "numel": sum(math.prod(shape) for shape in plan["parameters"].values()),
                "dtype": plan["dtype"], "shards_done": int(flags.sum()), "shards_total": len(flags),
                "complete": bool(flags.all()) and (plan["mode"] == "store" or bool(attrs.get("complete"))),
                "projection": _projection_label(lineage.get("projection")),
                **{f"lineage.{k}": v for k, v in lineage.items() if k not in _KEYS},
            })
        for path, meta in list_evaluations(self.store):
            lineage = meta["lineage"]
            rows.append({
                "kind": "evaluation", "path": path, "model": lineage.get("model"), "checkpoint": lineage.get("checkpoint"),
                "dataset": lineage.get("dataset"), "variant": ",".join(lineage.get("queries", {})),
                "paradigm": lineage.get("paradigm"), "complete": True,
                **{f"lineage.{k}": v for k, v in lineage.items() if k not in _KEYS},
            })
        for meta in list_datasets(self.store):
            rows.append({
                "kind": "dataset", "path": layout.dataset_version_dir(meta["dataset"], meta["variant"], meta["version"]),
                "dataset": meta["dataset"], "variant": meta["variant"], "n_samples": meta["n_samples"],
                "complete": True, "lineage.version": meta["version"], "lineage.content_hash": meta["content_hash"],
                "lineage.created_at": meta["created_at"],
                **{f"lineage.{k}": v for k, v in meta.get("lineage", {}).items()},
            })
        columns = ["kind", "path", *_KEYS, "projection", "n_samples", "n_parameters", "numel", "dtype", "shards_done",
                   "shards_total", "complete"]
        frame = pd.DataFrame(rows)
        return frame.reindex(columns=columns + sorted(c for c in frame.columns if c not in columns))

    def find_gradients(self, projection: dict | None = None, **where) -> str:
        """The path of the one gradient group (or, with `projection`, projection group) matching lineage keys."""
        unknown = set(where) - set(_KEYS)
        if unknown:
            raise LakeError(f"cannot select gradients by {sorted(unknown)}; use {list(_KEYS)}")
        groups = [(p, a["lineage"]) for p, a in self._gradient_groups()
                  if bool(a["lineage"].get("projection")) == (projection is not None)]
        if projection is not None:
            groups = [(p, lin) for p, lin in groups
                      if all(v is None or lin["projection"].get(k) == v for k, v in projection.items())]
            where = {**where, **{k: v for k, v in projection.items() if v is not None}}
        hits = [p for p, lin in groups if all(v is None or lin.get(k) == v for k, v in where.items() if k in _KEYS)]
        if len(hits) == 1:
            return hits[0]
        asked = {k: v for k, v in where.items() if v is not None}
        if not hits:
            have = sorted({tuple(lin.get(k) for k in _KEYS) for _, lin in groups})
            raise LakeError(f"no gradient group in {self.url} matches {asked}; the lake holds {have or 'none'} as {list(_KEYS)}")
        raise LakeError(f"{len(hits)} gradient groups match {asked}: {hits}; narrow it down with paradigm=, mode= or variant=")

    def gradients(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                  variant: str | None = None, paradigm: str | None = None, mode: str | None = None) -> xr.Dataset:
        """A gradient group as an xarray.Dataset: one variable per parameter tensor, coordinate ``sample``."""
        path = self.find_gradients(model=model, checkpoint=checkpoint, dataset=dataset, variant=variant,
                                   paradigm=paradigm, mode=mode)
        return xr.open_zarr(self.store.zarr_store, group=path, consolidated=False, zarr_format=3)

    def projections(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                    variant: str | None = None, paradigm: str | None = None, kind: str | None = None,
                    dim: int | None = None, seed: int | None = None, scope: str | None = None) -> xr.Dataset:
        """A projection group as an xarray.Dataset: one variable per tensor (or ``flat``), coordinate ``sample``."""
        path = self.find_gradients(model=model, checkpoint=checkpoint, dataset=dataset, variant=variant,
                                   paradigm=paradigm, projection={"kind": kind, "dim": dim, "seed": seed, "scope": scope})
        return xr.open_zarr(self.store.zarr_store, group=path, consolidated=False, zarr_format=3)

    def evaluation(self, model: str | None = None, checkpoint: str | None = None, dataset: str | None = None,
                   paradigm: str | None = None, table: str = "results") -> pd.DataFrame:
        """A select-vs-project evaluation's table (``results``, ``self_similarity`` or ``greedy``) as a DataFrame."""
        where = {"model": model, "checkpoint": checkpoint, "dataset": dataset, "paradigm": paradigm}
        hits = [p for p, meta in list_evaluations(self.store)
                if all(v is None or meta["lineage"].get(k) == v for k, v in where.items())]
        if len(hits) != 1:
            asked = {k: v for k, v in where.items() if v is not None}
            have = [p for p, _ in list_evaluations(self.store)]
            raise LakeError(f"{len(hits)} evaluations in {self.url} match {asked}; the lake holds {have or 'none'}")
        return read_evaluation(self.store, hits[0], table)

    def dataset(self, name: str, variant: str = "original", model: str | None = None,
                checkpoint: str | None = None, version: str | None = None) -> pd.DataFrame:
        """A dataset variant as a DataFrame (``id``, ``messages``), its latest version unless one is named.

        For ``variant="model_generated"`` name the generating model's lake key and checkpoint
        (as in the catalog), since generated answers differ between them.
        """
        if variant == "model_generated":
            if not (model and checkpoint):
                raise LakeError("model_generated answers differ per model and checkpoint; pass model= and checkpoint= "
                                "(the catalog lists them as variants 'model_generated.<model>.<checkpoint>')")
            variant = layout.generated_variant(model, checkpoint)
        return read_dataset(self.store, name, variant, version)


def _projection_label(projection: dict | None) -> str | None:
    if not projection:
        return None
    return f"{projection['kind']}/{projection['scope']}/d{projection['dim']}/s{projection['seed']}"


def open_lake(url: str, storage_options: dict | None = None) -> Lake:
    """Open a lake at an fsspec URL (``file:///...``, a path, or ``s3://bucket/prefix``)."""
    return Lake(url, storage_options)
