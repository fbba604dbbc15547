"""Verify beside running work: `gradlake verify` (and `--repair`) while eight workers extract into one S3 group.

A chunk being computed (leased, not yet flagged) or flagged a moment ago is work in progress, never
damage: verify must not report it, and `--repair` must not clear it.  The extraction, disturbed only
by those checks, must end bitwise equal to an undisturbed one.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import zarr
from typer.testing import CliRunner

from conftest import write_probe
from gradlake.flows.cli import app
from gradlake.lake import open_lake
from gradlake.lake.store import LakeStore
from gradlake.lake.verify import verify_lake

WORKERS, N, SHARD = 8, 16, 2


def spec_for(model_dir: str, lake: str):
    """Small chunks (two samples) so that many are written, verified and flagged while verify runs."""
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.gradients.plan import ExtractionSpec

    return ExtractionSpec(model=ModelSpec(model=model_dir, checkpoint="checkpoint-1", device="cpu"), dataset="probe",
                          layers=["model.layers.1.mlp.down_proj.weight", "model.norm.weight"], shard_size=SHARD,
                          batch_size=SHARD, max_length=96, lake=lake)


def run_worker(model_dir: str, lake: str, index: int, results) -> None:
    """One worker: creates (or joins) the group, then walks every shard from its own offset."""
    import traceback

    import torch

    from gradlake.tasks.gradients.extract import extract_shard
    from gradlake.tasks.gradients.plan import create_group, plan_extraction

    try:
        torch.set_num_threads(1)
        spec = spec_for(model_dir, lake)
        group = create_group(plan_extraction(spec))
        shards = list(range(N // SHARD))
        results.put((index, sum(extract_shard(spec, group, s, log=lambda *_: None, poll=0.1)
                                for s in shards[index:] + shards[:index])))
    except BaseException:  # said to the test, which shows it
        results.put((index, traceback.format_exc()))


def test_verify_and_repair_beside_eight_workers_never_touch_a_healthy_chunk(tiny_models, s3_endpoint, tmp_path):
    from gradlake.tasks.gradients.extract import extract_shard, finalize_task
    from gradlake.tasks.gradients.plan import create_group, plan_extraction

    lake, reference = "s3://lake/verify-live", f"file://{tmp_path}/reference"
    for url in (lake, reference):
        write_probe(url, N)
    model_dir = str(tiny_models["olmo2"])
    spec = spec_for(model_dir, reference)
    undisturbed = create_group(plan_extraction(spec))
    for s in range(N // SHARD):
        extract_shard(spec, undisturbed, s, log=lambda *_: None)
    assert finalize_task.fn(reference, [undisturbed.path])

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gradlake.tasks.gradients.extract"])
    results = context.Queue()
    procs = [context.Process(target=run_worker, args=(model_dir, lake, i, results)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    store, reported, passes, in_progress = LakeStore(lake), [], 0, 0
    while any(p.is_alive() for p in procs) or passes < 2:
        table = verify_lake(store, log=lambda *_: None)
        reported += [row for row in table.to_dict("records") if row["status"] == "damaged"]
        in_progress += int((table["status"] == "in progress").sum())
        result = CliRunner().invoke(app, ["verify", "--lake", lake, "--repair"])  # the command, repairing
        if result.exit_code or "repaired: run" in result.output:
            reported.append(result.output)
        passes += 1
    got = dict(results.get(timeout=60) for _ in procs)
    failed = {i: r for i, r in got.items() if isinstance(r, str)}
    assert not failed, next(iter(failed.values()))
    assert not reported, reported  # no healthy chunk reported, none cleared
    assert passes >= 2, passes  # verify really ran beside the extraction, repair included
    print(f"{passes} passes of verify and verify --repair; {in_progress} times a group had chunks in progress")
    assert sum(got.values()) == N, got  # every sample computed exactly once: nothing was cleared and redone
    assert finalize_task.fn(lake, [undisturbed.path])
    ours = zarr.open_group(store.zarr_store, path=undisturbed.path, mode="r")
    for name, array in undisturbed.group.arrays():
        assert np.array_equal(ours[name][:], array[:]), name
    assert open_lake(lake).catalog().query("kind == 'gradients'")["complete"].all()
