"""A real extraction process killed with SIGKILL resumes to the bytes of an uninterrupted run.

Completion is recorded per row-chunk (`shard_complete`, one flag per `BATCH` samples here, the
chunk height of the group), so the kill may land inside a shard: the rerun computes only the
chunks still missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import zarr

from conftest import REPO, write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.lake import open_lake
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.model import ModelSpec

N, SHARD, BATCH = 48, 4, 2


def cli_args(model_dir, lake) -> list[str]:
    return [sys.executable, "-m", "gradlake.flows.cli", "extract", "--model", str(model_dir), "--checkpoint", "checkpoint-1",
            "--dataset", "probe", "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--max-length", "256",
            "--lake", lake]


def chunks_done(lake: str) -> int:
    try:
        path = open_lake(lake).find_gradients(dataset="probe")
    except ValueError:
        return 0
    return int(zarr.open_array(f"{lake[len('file://'):]}/{path}/shard_complete", mode="r")[:].sum())


def test_sigkill_then_rerun_is_bitwise_identical(tiny_models, tmp_path):
    killed, clean = f"file://{tmp_path / 'killed'}", f"file://{tmp_path / 'clean'}"
    for lake in (killed, clean):
        write_probe(lake, N)
    total = N // BATCH  # row-chunks

    proc = subprocess.Popen(cli_args(tiny_models["olmo2"], killed), cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while chunks_done(killed) < 2 * SHARD // BATCH:
        assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = chunks_done(killed)
    assert 0 < done_at_kill < total, f"the kill must land partway ({done_at_kill}/{total} chunks done)"

    rerun = subprocess.run(cli_args(tiny_models["olmo2"], killed), cwd=REPO, env=os.environ.copy(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    extract_gradients(ExtractionSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"),
                                     dataset="probe", shard_size=SHARD, batch_size=BATCH, max_length=256, lake=clean))

    a, b = open_lake(killed), open_lake(clean)
    row = a.catalog().query("kind == 'gradients'").iloc[0]
    assert row["complete"] and row["chunks_done"] == row["chunks_total"] == total
    got, want = a.gradients(dataset="probe"), b.gradients(dataset="probe")
    assert list(got["sample"].values) == list(want["sample"].values) == [f"probe-{i:04d}" for i in range(1, N + 1)]
    assert set(got.data_vars) == set(want.data_vars)
    for name in want.data_vars:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    # No sample lost or doubled: every row holds a non-zero gradient, and no two rows are the same.
    g = got["lm_head.weight"].values
    assert (np.abs(g).sum(axis=1) > 0).all()
    assert len({row.tobytes() for row in g}) == N
