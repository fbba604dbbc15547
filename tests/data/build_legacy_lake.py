"""How the legacy-lake fixture was made: a small lake written by gradlake as of commit 76c1ce0.

`tests/test_legacy_lake.py` reopens, resumes and re-evaluates this lake with the current code; the
fixture is what proves that a lake written before the package was regrouped into stage subpackages
still works.  It was built ONCE, with the code of commit 76c1ce0 (the last commit with the flat
`tasks/*.py` modules), and is checked in; do not rebuild it with newer code, or it stops being a
legacy lake.  This script is kept to say exactly how it was made.

How it was run (the editable install maps ``gradlake.tasks/flows/lake`` to the working tree, so the
old tree is put first on the path through a shim package of symlinks)::

    git worktree add --detach /tmp/gradlake-old 76c1ce0
    mkdir -p /tmp/oldpkg/gradlake && touch /tmp/oldpkg/gradlake/__init__.py
    for d in tasks flows lake; do ln -sfn /tmp/gradlake-old/$d /tmp/oldpkg/gradlake/$d; done
    PYTHONPATH=/tmp/oldpkg OMP_NUM_THREADS=1 .venv/bin/python tests/data/build_legacy_lake.py

It refuses to run unless ``gradlake.tasks`` resolves outside this checkout (into the old tree).

What it writes, next to itself:

- ``legacy_model/checkpoint-0/``: a random-weight ``Olmo2ForCausalLM`` (OLMo-2-7B's architecture at
  toy size: width 32, 2 layers, MLP of 64) with a byte-level BPE tokenizer trained on the bundled
  probe set (``tasks/tiny.py``: ``train_tokenizer``, ``tiny_config``), float32 safetensors.
- ``legacy_lake/``: the lake (written as a ``file://`` lake):
  - dataset ``probe`` (the bundled probe set's first 8 rows), variants ``original`` and
    ``paraphrased`` (the ``create-dataset`` flow with ``paraphrase_column="paraphrase"``);
  - two COMPLETE gradient groups, ``sft-store`` of ``original`` and of ``paraphrased`` (the
    ``extract-gradients`` flow; the MLP down- and attention output projections, stored as
    bfloat16), each with two on-the-fly projection groups (rademacher flat d128, kronecker 4x4);
  - one INCOMPLETE group, ``pre-store`` of ``original`` (float32, one on-the-fly projection):
    created by ``plan_extraction`` + ``create_group`` and only shard 0 of its 2 computed
    (``extract_shard``), as a run killed after its first shard leaves it;
  - one finished select-vs-project evaluation of the complete groups (the ``evaluate`` flow),
    its results table in ``evaluations/.../sft/results.parquet``.
- ``legacy_lake.json``: the specs used (as JSON, without their lake URL), the paths the old code
  gave each group, and the commit, so that the test rebuilds the same specs with the new code.

The model's path.  Lake keys of models that are not hub ids include a hash of where the model is
(``lake.layout.model_key`` of ``tasks.model.lake_names``): a local directory is hashed by its
ABSOLUTE path, which differs between clones, so a lake built from ``tests/data/legacy_model``
could not be found again from another checkout.  A URL is hashed as written, and a checkpoint at
a URL is downloaded into ``$GRADLAKE_MODEL_CACHE`` before it is loaded (``cached_checkpoint``), so
the model is given as the fsspec in-memory URL ``memory://gradlake-legacy-v1/tiny-olmo2`` (the
same code path as a model on S3): this script and the test copy ``legacy_model/`` there first, in
their own process, and point the model cache at a temporary directory.  The URL, and so every
lake path, is then the same from any clone, with no fixed absolute path outside the test's
temporary directory.  ``resolved_commit`` (part of every group's fingerprint) is a content hash
of the checkpoint's files, which are checked in byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMMIT = "76c1ce0"
LAKE_DIR, MODEL_DIR, RECORD = HERE / "legacy_lake", HERE / "legacy_model", HERE / "legacy_lake.json"
MODEL_URL, CHECKPOINT = "memory://gradlake-legacy-v1/tiny-olmo2", "checkpoint-0"
N_SAMPLES = 8
LAYERS = ["model.layers.*.mlp.down_proj.weight", "model.layers.*.self_attn.o_proj.weight"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def old_tree() -> Path:
    """The tree `gradlake.tasks` is imported from; it must not be this checkout's."""
    import gradlake.tasks

    root = Path(os.path.realpath(gradlake.tasks.__path__[0])).parent
    if root == REPO:
        sys.exit(f"gradlake.tasks is imported from this checkout ({root}); run with PYTHONPATH=/tmp/oldpkg "
                 f"(see the docstring) so that the code of {COMMIT} writes the lake")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head.startswith(COMMIT):
        sys.exit(f"the old tree {root} is at {head or 'an unknown commit'}, not {COMMIT}")
    return root


def build_model(directory: Path) -> None:
    """A random-weight tiny OLMo-2 and its tokenizer, the way tasks/tiny.py builds them, at a smaller width."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.probes import load_probe_set, probe_variant
    from gradlake.tasks.tiny import tiny_config, train_tokenizer

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer(m["content"] for chat in chats for m in chat)
    torch.manual_seed(0)
    config = tiny_config("olmo2", tokenizer, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory / CHECKPOINT)
    tokenizer.save_pretrained(directory / CHECKPOINT)


def put_model_at_url(directory: Path, url: str) -> None:
    """Copy the checkpoint directory to the in-memory filesystem, where the specs name the model."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        fs.pipe_file(f"{root}/{file.relative_to(directory).as_posix()}", file.read_bytes())


def main() -> None:
    tree = old_tree()
    print(f"building with the code at {tree} ({COMMIT})")
    os.environ["GRADLAKE_MODEL_CACHE"] = tempfile.mkdtemp(prefix="gradlake-legacy-cache-")
    for stale in (LAKE_DIR, MODEL_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    RECORD.unlink(missing_ok=True)
    build_model(MODEL_DIR)
    put_model_at_url(MODEL_DIR, MODEL_URL)

    from gradlake.flows.dataset import DatasetSpec, create_dataset
    from gradlake.flows.evaluate import evaluate
    from gradlake.flows.extract import extract_gradients
    from gradlake.lake.gradients import GradientGroup
    from gradlake.tasks.evaluate import EvaluationSpec
    from gradlake.tasks.extract import ExtractionSpec, create_group, extract_shard, group_paths, plan_extraction
    from gradlake.tasks.model import ModelSpec
    from gradlake.tasks.probes import PROBE_FILE
    from gradlake.tasks.projection import ProjectionSpec
    from gradlake.tasks.sources import SourceSpec

    lake = f"file://{LAKE_DIR}"
    model = ModelSpec(model=MODEL_URL, checkpoint=CHECKPOINT, device="cpu")
    dataset = DatasetSpec(name="probe", source=SourceSpec(source=str(tree / "tasks" / PROBE_FILE), n=N_SAMPLES,
                                                          sampling="first"),
                          paraphrase_column="paraphrase", lake=lake)
    versions = create_dataset(dataset)

    projections = [ProjectionSpec(kind="rademacher", dim=128, scope="flat"),
                   ProjectionSpec(kind="kronecker", dim=16, factors=(4, 4), scope="per_tensor")]
    common = dict(model=model, dataset="probe", layers=LAYERS, shard_size=4, batch_size=4, max_length=256, lake=lake)
    complete = {variant: ExtractionSpec(**common, variant=variant, store_dtype="bfloat16", projections=projections)
                for variant in ("original", "paraphrased")}
    paths = {}
    for variant, spec in complete.items():
        path = extract_gradients(spec)
        paths[variant] = group_paths(spec, path)

    # A run stopped after its first shard: the group and its projection group are created, shard 0 of 2 is written.
    incomplete = ExtractionSpec(**common, variant="original", paradigm="pre", store_dtype="float32",
                                projections=[ProjectionSpec(kind="rademacher", dim=64, scope="flat", seed=1)])
    planned = plan_extraction(incomplete)
    group = create_group(planned)
    extract_shard(incomplete, group, 0)
    reopened = GradientGroup.open(group.store, planned.path)
    assert reopened.pending_shards(incomplete.shard_size) == [1], "the incomplete group must miss exactly its last shard"

    evaluation = EvaluationSpec(model=model, dataset="probe", queries=["paraphrased"], dense_baseline=False,
                                greedy_steps=4, lake=lake)
    directory = evaluate(evaluation)
    # Released claims and leases leave empty directories under .gradlake/; git keeps no empty directory, so the
    # fixture is made here as a clone will hold it.
    for folder in sorted((p for p in LAKE_DIR.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()

    record = {
        "about": f"written by gradlake at commit {COMMIT} with tests/data/build_legacy_lake.py; read by tests/test_legacy_lake.py",
        "commit": COMMIT,
        "model_url": MODEL_URL,
        "model_dir": MODEL_DIR.name,
        "checkpoint": CHECKPOINT,
        "n_samples": N_SAMPLES,
        "dataset": {"spec": dataset.model_dump(mode="json", exclude={"lake"}), "versions": versions},
        "complete": {v: {"spec": s.model_dump(mode="json", exclude={"lake"}), "paths": paths[v]} for v, s in complete.items()},
        "incomplete": {"spec": incomplete.model_dump(mode="json", exclude={"lake"}),
                       "paths": group_paths(incomplete, planned.path), "shards_done": [0], "shards_total": 2},
        "evaluation": {"spec": evaluation.model_dump(mode="json", exclude={"lake"}), "directory": directory},
    }
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
