"""The shipped notebook on the lake the demo builds, started where Jupyter starts it: notebooks/."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "explore_lake.ipynb"
# Every stage of the demo, at a size that keeps the suite short: 16 training samples, 4 LDS subsets, 8 queries.
DEMO_OPTIONS = ["--train-samples", "16", "--epochs", "30", "--subsets", "4", "--queries", "8"]


def build_demo_lake(tiny_models: dict[str, Path], tmp_path_factory) -> Path:
    """`gradlake demo --lake <base>/demo/demo-lake` (what `make demo` runs, with a smaller training set and LDS:
    DEMO_OPTIONS), once per session.

    The session's tiny models stand in for build/tiny-models and the session's Prefect server
    serves the runs.  A marker written after success lets every module that asks share one build.
    """
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist each test process has its own base directory; their parent is this session's, so the
    # processes share one build (the second waits on the lock) instead of spending five minutes on their own.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo"
    lake, built = root / "demo-lake", root / "demo-output.txt"
    root.mkdir(exist_ok=True)
    with open(root / ".building", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            _build(tiny_models, root, lake, built)
    return lake


def _build(tiny_models: dict[str, Path], root: Path, lake: Path, built: Path) -> None:
    """Run the demo into `lake`; `built` holds its console output once it succeeded."""
    env = {**os.environ, "GRADLAKE_DEMO_MODELS": str(Path(tiny_models["olmo2"]).parent)}
    for name in ("GRADLAKE_LAKE", "OPENAI_API_KEY", "OPENAI_BASE_URL"):  # the offline demo, as a new user runs it
        env.pop(name, None)
    done = subprocess.run([str(Path(sys.executable).parent / "gradlake"), "demo", "--lake", str(lake), *DEMO_OPTIONS], env=env,
                          cwd=root, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"gradlake demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    built.write_text(done.stdout)


@pytest.fixture(scope="session")
def demo_lake(tiny_models, tmp_path_factory) -> Path:
    """The demo's lake, at <dir>/demo-lake beside <dir>/notebooks as in a checkout."""
    return build_demo_lake(tiny_models, tmp_path_factory)


def run_notebook(cwd: Path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


@pytest.mark.parametrize("found_by", ["../demo-lake", "GRADLAKE_LAKE"])
def test_notebook_runs_unchanged_on_the_demo_lake(demo_lake, found_by, tmp_path, monkeypatch):
    """From notebooks/ it finds ../demo-lake (from anywhere, $GRADLAKE_LAKE), picks the evaluated model (not the
    catalog's first row, a model the demo never evaluates) and draws its plot."""
    if found_by == "GRADLAKE_LAKE":
        monkeypatch.setenv("GRADLAKE_LAKE", str(demo_lake))
        cwd = tmp_path
    else:
        monkeypatch.delenv("GRADLAKE_LAKE", raising=False)
        cwd = demo_lake.parent / "notebooks"
        cwd.mkdir(exist_ok=True)
    outputs = run_notebook(cwd)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    evaluated = next(p.name for p in (demo_lake / "evaluations").iterdir())
    assert evaluated.startswith("tiny-olmo2-probe-")  # the demo's trained model
    final = max(p.name for p in (demo_lake / "evaluations" / evaluated).glob("checkpoint-*"))
    assert f"gradients/{evaluated}/{final}/probe/original/sft-store 25 tensors, 160 samples" in printed
    assert f"model_generated: variant model_generated.{evaluated}.{final}, 160 samples" in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, "the redrawn plots are missing"
    assert any("proj:rademacher-flat-d1024-s0" in str(o.get("data", {})) for o in outputs)
    # The attribution benchmark of the final checkpoint, its training curve and EK-FAC's top samples for a query.
    assert f"attribution/{evaluated}/{final}/probe/benchmarks/held_out" in printed
    tables = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "influence-ekfac" in tables and "lds_ci_low" in tables and "top1 best tensor" in tables
    assert ("influence-ekfac: query probe-0001; its own original is 'probe-0001' (stored as 'original:probe-0001')"
            in printed)


def test_notebook_without_a_lake_says_where_it_looked(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    monkeypatch.delenv("GRADLAKE_LAKE", raising=False)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    with pytest.raises(CellExecutionError) as failed:
        run_notebook(notebooks)
    message = str(failed.value)
    assert f"no lake to open from {notebooks}" in message and "neither ./demo-lake nor ../demo-lake exists" in message
    assert "IndexError" not in message
