"""The checkpoint watcher: start the pipeline for every new checkpoint of the watched models, and again after a failure.

A checkpoint is done when the lake holds what the pipeline, with the watcher's settings, ends
with: its select-vs-project evaluation (when it evaluates), else every variant's gradient group
complete.  A gradient group alone is not enough: a pipeline that failed (no GPU worker) leaves
one with no chunk done.

The watcher's memory of its attempts is Prefect's own runs.  Each pipeline run it starts carries
an idempotency key naming the checkpoint, the lake and the attempt (`attempt_key`), so one query
a tick finds every earlier attempt of the checkpoints not done, and for each the tick
- starts nothing while an attempt is Scheduled, Late, Pending, Running or Paused (started earlier);
- starts the next attempt after one Failed, Crashed or was Cancelled (or Completed without its
  result in the lake, e.g. the lake was emptied since);
- starts nothing once `max_attempts` attempts have ended so, and says so in its log.
"""

from __future__ import annotations

import json
import re

import fsspec
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.pipeline import PipelineSettings, PipelineSpec
from gradlake.flows.run_names import named_by, run_label
from gradlake.lake import layout
from gradlake.lake.gradient_plan import read_meta
from gradlake.lake.results import complete_results
from gradlake.lake.store import LakeStore, storage_options_for
from gradlake.tasks.common.checkpoints import WatchedModel, is_hub_id, list_checkpoints
from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.model import ModelSpec, parameter_shapes, select_parameters
from gradlake.tasks.evaluate.spec import EvaluationSpec


PIPELINE_DEPLOYMENT = "gradlake-pipeline/gradlake-pipeline"


class WatchSpec(BaseModel):
    """Which models to watch, and how the pipeline processes each new checkpoint."""

    model_config = ConfigDict(extra="forbid")

    models: list[WatchedModel] = Field(title="Watched models", description="Hub repositories or checkpoint directories (local or s3://) to watch.")
    pipeline: PipelineSettings = Field(default=PipelineSettings(), title="Pipeline settings", description="How every new checkpoint goes through the pipeline (the pipeline's own form; the model, checkpoint and lake are filled in).")
    pipeline_deployment: str = Field(default=PIPELINE_DEPLOYMENT, title="Pipeline deployment", description="The pipeline deployment to start ('flow/deployment').")
    max_attempts: int = Field(default=3, ge=1, le=20, title="Attempts per checkpoint", description="Pipeline runs a checkpoint may get: one whose run failed, crashed or was cancelled is started again on a later tick until this many have ended so; then the watcher's log says so and names the command that reruns it.")
    lake: str = Field(title="Lake", description="Lake URL the pipeline writes to: s3://bucket/prefix, or file:///path on storage every worker shares.")


def evaluation_of(spec: PipelineSpec) -> EvaluationSpec | None:
    """The evaluation the pipeline ends with (as `flows.pipeline.pipeline` asks for it); None when it does not evaluate."""
    if not (spec.evaluate and "original" in spec.variants and len(spec.variants) > 1):
        return None
    return EvaluationSpec(model=spec.model, dataset=spec.dataset, queries=[v for v in spec.variants if v != "original"],
                          paradigm=spec.paradigm, target=spec.target, bm25=spec.bm25, lake=spec.lake)


def pipeline_done(store: LakeStore, spec: PipelineSpec) -> bool:
    """Does the lake hold what the pipeline `spec` ends with: its evaluation (of at least its query variants) when it
    evaluates, else a complete gradient group of every variant; each of the extraction `spec` asks for.

    Results are matched by the settings they record, never by their directory's name (which the
    extraction's settings may extend: `lake.layout`)."""
    model_key, checkpoint_key = lake_keys(spec.model)
    evaluation = evaluation_of(spec)
    if evaluation is not None:
        found = complete_results(store, layout.evaluation_dir(model_key, checkpoint_key, spec.dataset, "*"))
        return any(_evaluation_matches(store, meta.get("lineage") or {}, evaluation, spec.layers) for _, meta in found)
    for variant in spec.variants:
        extraction = spec.extraction(variant)
        directory = layout.gradients_dir(model_key, checkpoint_key, extraction.dataset, extraction.variant)
        metas = [read_meta(store, path[len(store.root) + 1:].rsplit("/", 1)[0]) for path in store.glob(f"{directory}/*/zarr.json")]
        if not any(meta.get("complete") and _extraction_matches(meta, extraction.paradigm, extraction.target, spec.layers)
                   for meta in metas):
            return False
    return True


def _extraction_matches(meta: dict, paradigm: str, target: str, layers: list[str]) -> bool:
    """Is a gradient group's `gradlake` attribute the per-sample extraction of this paradigm, target and layers?"""
    lineage = meta.get("lineage") or {}
    return (not lineage.get("projection") and meta.get("plan", {}).get("mode", lineage.get("mode")) == "store"
            and lineage.get("paradigm") == paradigm and lineage.get("target", "parameters") == target
            and list(lineage.get("layer_patterns") or []) == list(layers))


def _evaluation_matches(store: LakeStore, lineage: dict, evaluation: EvaluationSpec, layers: list[str]) -> bool:
    """Is an evaluation's lineage this one's: paradigm, target, BM25 protocol, at least its queries, the same layers?"""
    settings = lineage.get("settings") or {}
    if any(settings.get(name, EvaluationSpec.model_fields[name].default) != getattr(evaluation, name)
           for name in ("paradigm", "target", "bm25")) or not set(evaluation.queries) <= set(settings.get("queries", [])):
        return False
    if "layer_patterns" in lineage:
        return list(lineage["layer_patterns"] or []) == list(layers)
    original = (lineage.get("gradient_groups") or {}).get("original")  # older evaluations: ask the group they read
    return original is not None and list((read_meta(store, original).get("lineage") or {}).get("layer_patterns") or []) == list(layers)


def attempt_key(spec: PipelineSpec, attempt: int) -> str:
    """The idempotency key of a checkpoint's `attempt`-th pipeline run in this lake (the first: the key watchers
    always gave it, so runs started before attempts were counted are found as attempt 1)."""
    key = f"gradlake-watch:{lake_keys(spec.model)[0]}@{spec.model.checkpoint}:{spec.lake}"
    return key if attempt == 1 else f"{key}:attempt-{attempt}"


def earlier_attempts(specs: list[PipelineSpec], max_attempts: int) -> dict[str, list[tuple[int, object]]]:
    """(attempt, flow run) of every earlier pipeline run of these checkpoints, by checkpoint, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    keys = {attempt_key(spec, n): (spec.model.checkpoint, n) for spec in specs for n in range(1, max_attempts + 1)}
    wanted, found = list(keys), []
    with get_client(sync_client=True) as client:
        for i in range(0, len(wanted), 200):  # the API returns at most 200 runs per call
            found += client.read_flow_runs(flow_run_filter=FlowRunFilter(
                idempotency_key=FlowRunFilterIdempotencyKey(any_=wanted[i:i + 200])), limit=200)
    attempts: dict[str, list[tuple[int, object]]] = {}
    for run in sorted(found, key=lambda r: (r.created is None, r.created, keys[r.idempotency_key][1])):
        checkpoint, n = keys[run.idempotency_key]
        attempts.setdefault(checkpoint, []).append((n, run))
    return attempts


def ended(run) -> str:
    """How a finished attempt ended, for the log: its state and the first lines of its message."""
    state = run.state
    message = " ".join((state.message or "").split())
    message = message if len(message) <= 300 else message[:297] + "..."
    text = state.name + (f": {message}" if message else "")
    return text + (" (but the lake lacks its result)" if state.is_completed() else "")


def awaited_directory(watched: WatchedModel) -> str | None:
    """A line saying that a watched directory is not there yet (None when it is, or for a hub repository).

    ValueError when not even the directory's parent (a local path) or bucket (an object store) is
    there: a mistyped path, not a training run that has yet to write its first checkpoint."""
    if is_hub_id(watched.model):
        return None
    fs, root = fsspec.core.url_to_fs(watched.model, **storage_options_for(watched.model, watched.storage_options))
    if fs.isdir(root):
        return None
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    local = bool({"file", "local"} & set(protocols))
    # Object stores have no directories until something is written under them: only the bucket must exist.
    anchor = root.rstrip("/").rsplit("/", 1)[0] if local else root.split("/", 1)[0]
    if not fs.isdir(anchor):
        raise ValueError(f"watched directory {watched.model!r} does not exist, nor does its {'parent' if local else 'bucket'} "
                         f"{anchor!r}; give the directory the trainer writes its checkpoints into")
    return f"{watched.model} is not there yet; each tick waits for it to appear"


def check_watched(spec: WatchSpec, watched: WatchedModel) -> None:
    """Refuse, before the schedule is on, what no tick could ever use: a pattern that is no regular expression,
    layer patterns that match no parameter of the model's newest finished checkpoint (when it has one yet)."""
    try:
        re.compile(watched.pattern)
    except re.error as err:
        raise ValueError(f"--pattern {watched.pattern!r} of {watched.model} is not a regular expression ({err}); "
                         "give one a checkpoint name must match in full, e.g. 'checkpoint-\\d+' or 'step\\d+'") from None
    if not spec.pipeline.layers or is_hub_id(watched.model) or awaited_directory(watched):
        return
    checkpoints = list_checkpoints(watched)
    if not checkpoints:
        return  # the first checkpoint's tick checks them
    if spec.pipeline.target != "parameters":
        raise ValueError(f"layers {spec.pipeline.layers} choose weights, but target {spec.pipeline.target!r} is the "
                         "gradient with respect to the input embeddings alone: leave layers empty, or use target 'parameters'")
    model = ModelSpec(model=watched.model, checkpoint=checkpoints[-1])
    select_parameters(list(parameter_shapes(model)), spec.pipeline.layers, f"{watched.model}@{checkpoints[-1]}")


def tick_label(spec: WatchSpec) -> str:
    """A tick's run name: 'watch' and the watched models as the lake keys them (e.g. 'watch tiny-olmo2-b5d6f1a0')."""
    return "watch " + ", ".join(lake_keys(ModelSpec(model=m.model))[0] for m in spec.models)


@flow(name="watch-checkpoints", log_prints=True, flow_run_name=named_by(WatchSpec, tick_label, "watch-checkpoints"))
def watch_checkpoints(spec: WatchSpec) -> list[str]:
    """One tick: list checkpoints, skip those done in the lake or started earlier, start the pipeline for the others."""
    import datetime as dt

    log = get_run_logger()
    tick = dt.datetime.now(dt.timezone.utc)
    store = LakeStore(spec.lake)
    started = []
    for watched in spec.models:
        try:
            waiting = awaited_directory(watched)
        except ValueError as err:  # the watcher was started before the directory's parent was made, too
            waiting = str(err)
        if waiting:
            log.info("waiting for %s to appear (nothing to list yet)", watched.model)
            continue
        unfinished: list[str] = []
        checkpoints = list_checkpoints(watched, unfinished)
        todo = {}
        for checkpoint in checkpoints:
            model = ModelSpec(model=watched.model, checkpoint=checkpoint, dtype=watched.dtype, device=watched.device)
            params = PipelineSpec(**spec.pipeline.model_dump(), model=model, lake=spec.lake)
            if not pipeline_done(store, params):
                todo[checkpoint] = params
        attempts = earlier_attempts(list(todo.values()), spec.max_attempts) if todo else {}
        new = already = 0
        given_up = []
        for checkpoint, params in todo.items():
            runs = attempts.get(checkpoint, [])
            if any(run.state is None or not run.state.is_final() for _, run in runs):
                live = next(run for _, run in runs if run.state is None or not run.state.is_final())
                log.info("checkpoint %s of %s: pipeline run %s (%s) was started by an earlier tick", checkpoint,
                         watched.model, live.id, live.state.name if live.state else "no state yet")
                already += 1
                continue
            if len(runs) >= spec.max_attempts:
                rerun = json.dumps(params.model_dump(mode="json", exclude_defaults=True))
                log.warning("%s of %s failed %d times; not started again. Last error: %s; rerun it with "
                            "`gradlake pipeline --spec '%s'`, or raise the watcher's max_attempts", checkpoint,
                            watched.model, len(runs), ended(runs[-1][1]), rerun)
                given_up.append(checkpoint)
                continue
            attempt = min(set(range(1, spec.max_attempts + 1)) - {n for n, _ in runs})  # a deleted run's number is free again
            # The key makes a second tick (or a retried one) return the same run instead of a new one;
            # the attempt in it lets a failed run be followed by a new one.
            run = run_deployment(spec.pipeline_deployment, parameters={"spec": params.model_dump(mode="json")}, timeout=0,
                                 idempotency_key=attempt_key(params, attempt),
                                 flow_run_name=run_label(params.model, spec.pipeline.dataset), as_subflow=False)
            if run.created is not None and run.created < tick:  # another tick started it since this one looked
                log.info("checkpoint %s of %s: pipeline run %s was started by an earlier tick", checkpoint, watched.model, run.id)
                already += 1
                continue
            if runs:
                log.info("%s of %s: attempt %d of %d (the previous run %s): pipeline run %s", checkpoint, watched.model,
                         attempt, spec.max_attempts, ended(runs[-1][1]), run.id)
            else:
                log.info("new checkpoint %s of %s: pipeline run %s", checkpoint, watched.model, run.id)
            started.append(checkpoint)
            new += 1
        log.info("%s: %d finished checkpoints (%d done in the lake, %d started earlier, %d started now%s)%s",
                 watched.model, len(checkpoints), len(checkpoints) - len(todo), already, new,
                 f", {len(given_up)} given up after {spec.max_attempts} attempts: {given_up}" if given_up else "",
                 f"; {len(unfinished)} still being written: {unfinished}" if unfinished else "")
    return started
