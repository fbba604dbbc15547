"""Runs at the same time on one lake: creation races and many shard workers on one S3 group.

A group is created under a claim (an object created only if absent: `O_EXCL` locally,
`If-None-Match: *` on S3), so two runs with different settings end in one good group and one
clear refusal, in either order; runs with the same settings share the group, and their workers
lease row-chunks so that each is computed once.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest
import zarr

from conftest import write_probe
from gradlake.lake import claims
from gradlake.lake.gradient_plan import GradientPlan
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.store import LakeError, LakeStore

PATH = "gradients/m/c/probe/original/sft-store"
N_SAMPLES, WIDTH = 16, 12


def plan(dtype: str) -> GradientPlan:
    # Enough arrays that creating the group takes a while: the other run arrives in the middle of it.
    return GradientPlan(n_samples=N_SAMPLES, parameters={f"layer{i}.weight": [4, 3] for i in range(24)}, mode="store",
                        dtype=dtype, max_tokens=WIDTH, chunk_rows=4)


def create(store: LakeStore, dtype: str, seed: int):
    tokens = np.random.default_rng(seed).integers(0, 100, (N_SAMPLES, WIDTH)).astype(np.int32)
    lineage = {"model": "m", "dtype_asked": dtype}
    return GradientGroup.create(store, PATH, plan(dtype), lineage, [f"s{i}" for i in range(N_SAMPLES)], tokens,
                                tokens % 2 == 0)


def race(store: LakeStore, first: str, second: str) -> dict:
    """Start `first`, then `second` while the first is creating; what each got."""
    out: dict = {}

    def run(dtype: str, seed: int) -> None:
        try:
            out[dtype] = create(store, dtype, seed)
        except Exception as err:  # what the run would report
            out[dtype] = err

    a = threading.Thread(target=run, args=(first, 1))
    a.start()
    deadline = time.monotonic() + 30
    while claims.read_claim(store, f"create/{PATH}") is None and a.is_alive():  # the first holds the claim
        assert time.monotonic() < deadline
        time.sleep(0.005)
    b = threading.Thread(target=run, args=(second, 2))
    b.start()
    a.join()
    b.join()
    return out


@pytest.fixture
def store(lake_store):
    """An empty lake on the local filesystem and on the loopback S3 endpoint (conftest's lake_store)."""
    return lake_store


@pytest.mark.parametrize("first,second", [("float32", "float16"), ("float16", "float32")])
def test_creation_race_with_other_settings_gives_one_group_and_one_refusal(store, first, second):
    got = race(store, first, second)
    assert isinstance(got[first], GradientGroup), got[first]
    refusal = got[second]
    assert isinstance(refusal, LakeError) and "plan.dtype" in str(refusal) and "\n" not in str(refusal), refusal
    group = GradientGroup.open(store, PATH)
    assert group.plan.dtype == first and group.lineage["dtype_asked"] == first
    expected = np.random.default_rng(1).integers(0, 100, (N_SAMPLES, WIDTH))
    assert np.array_equal(group.group["input_ids"][:], expected)  # the winner's tokens, not a mix
    assert all(str(group.group[f"layer{i}.weight"].dtype) == first for i in range(24))
    assert claims.read_claim(store, f"create/{PATH}") is None  # the claim is gone once the group is made


def test_same_settings_share_one_creation(store):
    got = race(store, "float32", "float32")
    assert isinstance(got["float32"], GradientGroup)
    group = GradientGroup.open(store, PATH)
    assert np.array_equal(group.group["input_ids"][:], np.random.default_rng(1).integers(0, 100, (N_SAMPLES, WIDTH)))


def test_stale_creation_claim_is_taken_over(store):
    """A run that died while creating leaves its claim; once it has expired, the next run creates the group."""
    assert claims.take(store, f"create/{PATH}", "dead-run", 0.05, {"fingerprint": "other"})
    time.sleep(0.1)
    assert isinstance(create(store, "float16", 1), GradientGroup)


def _hold(url: str, key: str, ready, stop) -> None:
    claims.take(LakeStore(url), key, "other-process", 600)
    ready.set()
    stop.wait(60)


def test_a_claim_of_a_dead_process_on_this_machine_is_taken_over_at_once(store):
    """Not expired, but its process is gone (a SIGKILL): taken over; a live process's claim is not."""
    context = multiprocessing.get_context("spawn")
    for key, stays_alive in (("leases/g/0", True), ("leases/g/1", False)):
        ready, stop = context.Event(), context.Event()
        holder = context.Process(target=_hold, args=(store.url, key, ready, stop))
        holder.start()
        assert ready.wait(60)
        held = claims.read_claim(store, key)
        assert held.about["process"]["pid"] == holder.pid and not held.expired
        if not stays_alive:
            holder.kill()  # killed inside stop.wait(): setting `stop` after that would block on its condition
            holder.join()
        assert claims.take(store, key, "next-run", 600) is not stays_alive
        if stays_alive:
            stop.set()
            holder.join()
    assert claims.read_claim(store, "leases/g/1").owner == "next-run"
    assert claims.read_claim(store, "leases/g/0").owner == "other-process"
    # A claim from another machine is only ever judged by its expiry.
    assert not claims.died_here({"process": {"host": "elsewhere", "pidns": claims.this_process()["pidns"], "pid": 1}})


# -- eight shard workers on one S3 group ------------------------------------------------------------

WORKERS, N, SHARD = 8, 16, 2


def _spec(model_dir: str, lake: str):
    from gradlake.tasks.gradients.plan import ExtractionSpec
    from gradlake.tasks.common.model import ModelSpec

    return ExtractionSpec(model=ModelSpec(model=model_dir, checkpoint="checkpoint-1", device="cpu"), dataset="probe",
                          layers=["model.layers.1.mlp.*", "lm_head.weight"], shard_size=SHARD, batch_size=SHARD,
                          max_length=96, lake=lake)


def _worker(model_dir: str, lake: str, index: int, results) -> None:
    """One worker of a run: plans and creates (or joins) the group, then walks every shard from its own offset."""
    import traceback

    import torch

    from gradlake.tasks.gradients.plan import create_group, plan_extraction
    from gradlake.tasks.gradients.extract import extract_shard

    try:
        torch.set_num_threads(1)
        spec = _spec(model_dir, lake)
        group = create_group(plan_extraction(spec))
        shards = list(range(N // SHARD))
        computed = sum(extract_shard(spec, group, s, log=lambda *_: None, poll=0.2)
                       for s in shards[index:] + shards[:index])
        results.put((index, computed))
    except BaseException:  # said to the test, which shows it
        results.put((index, traceback.format_exc()))


def test_eight_workers_on_one_s3_group_compute_each_chunk_once(tiny_models, s3_endpoint, tmp_path):
    from gradlake.lake import open_lake
    from gradlake.tasks.gradients.plan import create_group, plan_extraction
    from gradlake.tasks.gradients.extract import extract_shard

    lake, reference = "s3://lake/eight-workers", f"file://{tmp_path}/reference"
    for url in (lake, reference):
        write_probe(url, N)
    model_dir = str(tiny_models["olmo2"])
    spec = _spec(model_dir, reference)
    group = create_group(plan_extraction(spec))
    for s in range(N // SHARD):
        extract_shard(spec, group, s, log=lambda *_: None)

    # Workers fork from a clean server process that imported gradlake once (not from this process, whose
    # threads (the S3 server's, pytest's) a fork would copy in whatever state they are in).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gradlake.tasks.gradients.extract"])
    results = context.Queue()
    procs = [context.Process(target=_worker, args=(model_dir, lake, i, results)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    failed = {i: r for i, r in got.items() if isinstance(r, str)}
    assert not failed, next(iter(failed.values()))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(got.values()) == N, got  # every sample computed once, by one of the workers
    assert sum(1 for c in got.values() if c) > 1, got  # and the work was shared
    ours = zarr.open_group(LakeStore(lake).zarr_store, path=group.path, mode="r")
    for name, array in group.group.arrays():
        assert np.array_equal(ours[name][:], array[:]), name
    assert open_lake(lake).catalog().query("kind == 'gradients'")["complete"].all()
    assert not LakeStore(lake).glob(".gradlake/leases/**/*.json")  # every lease released
