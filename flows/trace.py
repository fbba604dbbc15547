"""The tracing flow: is a candidate model derived from a base?  Statistics, p-values and the loss path into the lake."""

from __future__ import annotations

import io
import json

import pandas as pd
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.run_names import named_by_model, run_label
from gradlake.lake.results import read_result_meta
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.common.render import artifact_markdown, lake_location
from gradlake.tasks.tracing.trace import (LAKE_HELP, TraceSettings, TraceSpec, plan_trace, plan_trace_task, trace_task,
                                          tracing_dir, write_summary)


TRACE_DEPLOYMENT = "trace-models/trace-models"


@flow(name="trace-models", log_prints=True,
      flow_run_name=named_by_model(TraceSpec, lambda s: f"traced against {s.base.model}@{s.base.checkpoint or 'main'}",
                                   "trace-models"))
def trace_models(spec: TraceSpec) -> str:
    """Statistics of the candidate against the base (unaligned and aligned), with p-values; returns the lake directory."""
    directory = trace_task(spec, plan_trace_task(spec))
    store = LakeStore(spec.lake)
    meta = read_result_meta(store, directory, what="tracing result")
    with store.fs.open(store.path(f"{directory}/report.md"), "r") as handle:
        report = handle.read()
    where = lake_location(store, directory)
    markdown = artifact_markdown(report, lambda name: store.fs.cat_file(store.path(f"{directory}/plots/{name}")), where)
    create_markdown_artifact(markdown + f"\n\nfull results: {where}", description=f"model tracing: {meta['verdict']}")
    return directory


class _Many(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: ModelSpec = Field(title="Base model", description="The model every candidate is traced against.")
    candidates: list[ModelSpec] = Field(min_length=1, title="Candidates", description="Models (or checkpoints of one training run) to trace against the base, each in a run of its own.")
    lake: str = Field(title="Lake", description=LAKE_HELP)


class TraceManySpec(TraceSettings, _Many):  # the models and the lake come first in the Prefect form
    """Many candidates against one base: each a trace-models run of its own, then one summary table."""

    trace_deployment: str | None = Field(default=TRACE_DEPLOYMENT, title="Tracing deployment", description="Deployment that runs each pair on the GPU pool ('flow/deployment'); empty runs them one after another inside this flow run.")
    run_timeout_s: float = Field(default=6 * 3600, gt=0, title="Run timeout (seconds)", description="Longest the tracing runs may take together once a worker has taken one.")
    worker_wait_s: float = Field(default=900, gt=0, title="Wait for a worker (seconds)", description="How long the runs may wait while no worker polls their pool; then they are cancelled and this flow fails, naming the pool.")

    @property
    def model(self) -> ModelSpec:
        return self.base

    def pair(self, candidate: ModelSpec) -> TraceSpec:
        settings = self.model_dump(include=set(TraceSettings.model_fields))
        return TraceSpec(**settings, base=self.base, candidate=candidate, lake=self.lake)


@flow(name="trace-many", log_prints=True,
      flow_run_name=named_by_model(TraceManySpec, lambda s: f"{len(s.candidates)} candidates traced", "trace-many"))
def trace_many(spec: TraceManySpec) -> str:
    """Every candidate against the base (fanned out on the GPU pool), then the base's summary table; returns its directory."""
    log = get_run_logger()
    pairs = [spec.pair(c) for c in spec.candidates]
    plans = [plan_trace(pair) for pair in pairs]  # every pair checked before any run starts
    if spec.trace_deployment is None:
        for pair, planned in zip(pairs, plans):
            trace_task(pair, planned)
    else:
        from gradlake.flows.fanout import run_each_on_pool

        runs = [(run_label(pair.candidate, f"traced against {pair.base.model}@{pair.base.checkpoint or 'main'}"),
                 {"spec": pair.model_dump(mode="json")}, f"{runtime.flow_run.id}:{tracing_dir(pair)}") for pair in pairs]
        run_each_on_pool(spec.trace_deployment, runs, spec.run_timeout_s, spec.worker_wait_s, what="tracing",
                         rerun="rerun trace-many to redo only those pairs")
    store = LakeStore(spec.lake)
    directory = write_summary(store, spec.base)
    table = pd.read_parquet(io.BytesIO(store.fs.cat_file(store.path(f"{directory}/summary.parquet"))))
    create_table_artifact(json.loads(table.to_json(orient="records")),
                          description=f"model tracing against {spec.base.model}: {int(table['derived'].sum())} of "
                                      f"{len(table)} candidates derived")
    log.info("summary of %d candidates at %s/%s/summary.parquet", len(table), spec.lake, directory)
    return directory


if __name__ == "__main__":
    trace_models.serve(name="trace-models")
