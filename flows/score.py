"""Scoring at scale: the queries' top-k against a lake group, in this process or fanned out over a work pool.

``score-topk`` cuts the lake group's rows into ranges (`ScoreSpec.rows_per_run`), sends each
range still without a complete partial result to the ``score-rows`` deployment (one work-pool
run each, through `flows.fanout`: the same waiting, cancelling, retries, logs and UI as the
extraction shards), then merges the partial top-ks into one result.  A rerun sends only the
ranges whose result is missing.  See docs/scoring.md.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from gradlake.tasks.evaluate.scoring import (ScoreSpec, compute_topk, merge_parts, pending_parts, ranges, score_part_task,
                                             write_scores)


@flow(name="score-rows", log_prints=True)
def score_rows(spec: ScoreSpec, start: int, stop: int) -> str:
    """The top-k of the queries among rows [start, stop) of the lake group, written as a partial result."""
    get_run_logger().info("rows %d-%d of %s on worker %s", start, stop, spec.docs, os.environ.get("PREFECT__WORKER_NAME", "in-process"))
    return score_part_task(spec, start, stop)


def _fan_out(spec: ScoreSpec, parts: list[tuple[int, int]]) -> None:
    from prefect import runtime

    from gradlake.flows.fanout import run_each_on_pool

    runs = [(f"score rows {a}-{b}", {"spec": spec.model_dump(mode="json"), "start": a, "stop": b},
             f"{runtime.flow_run.id}:{spec.key()}:{a}-{b}") for a, b in parts]
    run_each_on_pool(spec.deployment, runs, spec.run_timeout_s, spec.worker_wait_s, what="scoring",
                     rerun="run score-topk again: ranges already scored are kept")


@flow(name="score-topk", log_prints=True)
def score_topk(spec: ScoreSpec) -> str:
    """Each query's k best rows of the lake group; returns the result's directory in the lake."""
    log = get_run_logger()
    if spec.rows_per_run is None:
        topk, parts = compute_topk(spec), 1
    else:
        every = ranges(spec)
        todo = pending_parts(spec, every)
        log.info("%d ranges of rows, %d to score on %s", len(every), len(todo), spec.deployment)
        if todo:
            _fan_out(spec, todo)
        topk, parts = merge_parts(spec, every), len(every)
    directory = write_scores(spec, topk, parts)
    log.info("top-%d of %d queries written to %s/%s", spec.k, topk.rows.shape[0], spec.lake, directory)
    return directory


if __name__ == "__main__":
    import sys

    score_topk(ScoreSpec.model_validate_json(sys.argv[1]))
