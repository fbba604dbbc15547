"""The analyst API on the demo's lake: one rule for naming a model and variant, errors that name what separates
the hits, and one line (not a traceback) when the lake, the S3 endpoint, its credentials or Prefect cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, free_port
from gradlake.lake import LakeError, open_lake
from test_notebook import build_demo_lake

GRADLAKE = str(Path(sys.executable).parent / "gradlake")
SECRET = "gradlake-test-secret-4f1c"  # must never be printed


@pytest.fixture(scope="session")
def demo_lake(tiny_models, tmp_path_factory) -> Path:
    return build_demo_lake(tiny_models, tmp_path_factory)  # the same build test_notebook.py uses


@pytest.fixture(scope="module")
def rows(demo_lake):
    """The catalog's stored (unprojected) gradient groups, from which the expected paths are read."""
    catalog = open_lake(str(demo_lake)).catalog()
    return catalog[(catalog["kind"] == "gradients") & catalog["projection"].isna()]


TRAINED = "olmo2-probe"  # the demo's tiny OLMo-2 trained on the probe set; "olmo" and "olmo2" are the random bases


def _row(rows, arch: str, checkpoint: str, variant: str):
    hit = rows[rows["path"].str.startswith(f"gradients/tiny-{arch}-") & (rows["checkpoint"] == checkpoint)
               & rows["variant"].str.startswith(variant)]
    assert len(hit) == 1, hit["path"].tolist()
    return hit.iloc[0]


@pytest.fixture(scope="module")
def checkpoints(rows) -> list[str]:
    """The trained model's checkpoints the demo extracted, step 0 first."""
    names = sorted(set(rows.loc[rows["path"].str.startswith(f"gradients/tiny-{TRAINED}-"), "checkpoint"]))
    assert len(names) >= 2 and names[0] == "checkpoint-000000", names
    return names


def test_readme_snippet_from_a_directory_holding_lake_tasks_and_flows(demo_lake, rows, checkpoints, tmp_path):
    """A user's own ./lake, ./tasks and ./flows (here packages that fail on import) do not shadow gradlake's."""
    for name in ("lake", "tasks", "flows"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own ./{name} was imported')\n")
    final = checkpoints[-1]
    key = _row(rows, TRAINED, final, "original")["path"].split("/")[1]
    snippet = textwrap.dedent(f"""
        from gradlake.lake import open_lake
        lake = open_lake({str(demo_lake)!r})
        print("catalog", len(lake.catalog()))
        ds = lake.gradients(model={key!r}, checkpoint={final!r}, dataset="probe", variant="paraphrased")
        print("tensor", ds["model.layers.1.mlp.down_proj.weight"].shape)
        print("projection", lake.projections(checkpoint={final!r}, variant="paraphrased", kind="rademacher", dim=1024)["flat"].shape)
        print("evaluation", sorted(set(lake.evaluation(checkpoint={final!r}, dataset="probe")["query"])))
        print("original", len(lake.dataset("probe", "original")))
        print("generated", len(lake.dataset("probe", "model_generated", model={key!r}, checkpoint={final!r})))
        print("attribution", len(lake.attribution(checkpoint={final!r}, queries="held_out")))
        print("scores", lake.scores("influence-ekfac", checkpoint={final!r}, queries="paraphrased").shape)
        import gradlake.lake
        print("from", gradlake.lake.__file__)
    """)
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert int(printed["catalog"]) == len(open_lake(str(demo_lake)).catalog()) > 0
    assert printed["tensor"].startswith("(160, ") and printed["projection"] == "(160, 1024)"
    assert printed["evaluation"] == "['model_generated', 'paraphrased']"
    assert printed["original"] == printed["generated"] == "160"
    assert int(printed["attribution"]) >= 9  # methods and the two references
    assert printed["scores"] == "(8, 16)"  # the LDS queries x the trained-on samples (tests' DEMO_OPTIONS)
    assert printed["from"] == str(REPO / "lake" / "__init__.py")


def test_a_model_is_named_by_its_key_its_id_or_its_path(demo_lake, rows, checkpoints, monkeypatch):
    lake = open_lake(str(demo_lake))
    final = checkpoints[-1]
    want = _row(rows, TRAINED, final, "original")
    model_path, key = want["model_id"], want["path"].split("/")[1]
    assert want["model"] == key
    monkeypatch.chdir(Path(model_path).parent.parent)
    names = [key, model_path, model_path + "/", os.path.relpath(model_path)]
    assert not names[-1].startswith("/")
    for name in names:
        assert lake.find_gradients(model=name, checkpoint=final, variant="original", mode="store") == want["path"]
    reference = lake.gradients(model=key, checkpoint=final, variant="original")["lm_head.weight"].values
    assert np.array_equal(lake.gradients(model=names[-1], checkpoint=final, variant="original")["lm_head.weight"].values,
                          reference)
    assert lake.evaluation(model=key, checkpoint=final).equals(lake.evaluation(model=model_path, checkpoint=final))
    assert lake.attribution(model=key, checkpoint=final, queries="held_out").equals(
        lake.attribution(model=names[-1], checkpoint=final, queries="held_out"))
    assert lake.dataset("probe", "model_generated", model=names[-1], checkpoint=final).equals(
        lake.dataset("probe", "model_generated", model=key, checkpoint=final))
    with pytest.raises(LakeError, match=r"no gradient group in .* matches \{'model': 'tiny-olmo2'\}"):
        lake.find_gradients(model="tiny-olmo2")  # a key's name part alone is no model


def test_model_generated_means_the_asked_models_own_answers(demo_lake, rows, checkpoints):
    lake = open_lake(str(demo_lake))
    final = checkpoints[-1]
    want = _row(rows, TRAINED, final, "model_generated")
    key, full = want["path"].split("/")[1], want["variant"]
    assert full == f"model_generated.{key}.{final}"
    assert lake.find_gradients(model=key, checkpoint=final, variant="model_generated") == want["path"]
    assert lake.find_gradients(variant=full) == want["path"]
    short = lake.projections(model=want["model_id"], checkpoint=final, variant="model_generated", kind="sparse")
    assert np.array_equal(short["flat"].values, lake.projections(variant=full, kind="sparse")["flat"].values)
    assert lake.dataset("probe", "model_generated", model=key, checkpoint=final).equals(lake.dataset("probe", full))
    for lookup in (lambda: lake.gradients(variant="model_generated"),
                   lambda: lake.gradients(model=key, variant="model_generated"),
                   lambda: lake.dataset("probe", "model_generated", model=key)):
        with pytest.raises(LakeError) as missing:
            lookup()
        assert str(missing.value) == ("variant 'model_generated' means one model's own answers at one checkpoint; pass "
                                      f"model= and checkpoint= with it, or the variant's full name ({full!r})")
    with pytest.raises(LakeError, match=f"has no model_generated variant .* at checkpoint '{checkpoints[0]}'.*{full}"):
        lake.dataset("probe", "model_generated", model=key, checkpoint=checkpoints[0])


def test_the_catalog_names_models_and_samples_alike_in_every_kind(demo_lake, checkpoints):
    """`model` is the lake key and `checkpoint` its key in every kind of row, as in the paths; `model_id` the id or
    path the stage was given; a filter by either finds every kind; sample ids are plain ids in every reader."""
    lake = open_lake(str(demo_lake))
    catalog = lake.catalog()
    kinds = {"gradients", "evaluation", "attribution", "scores"}
    assert kinds <= set(catalog["kind"])
    rows = catalog[catalog["kind"].isin(kinds)]
    assert (rows["model"] == rows["path"].str.split("/").str[1]).all()
    assert (rows["checkpoint"] == rows["path"].str.split("/").str[2]).all()
    key = next(m for m in rows["model"] if m.startswith(f"tiny-{TRAINED}-"))
    mine = rows[rows["model"] == key]
    assert kinds <= set(mine["kind"]), "a filter by the lake key finds every kind"
    ids = set(mine["model_id"].dropna())
    assert len(ids) == 1 and mine["model_id"].notna().all(), mine[["kind", "model_id"]]
    model_id = ids.pop()
    assert Path(model_id).is_dir()  # the demo's trained model: a local directory
    assert set(rows.loc[rows["model_id"] == model_id, "kind"]) >= kinds, "a filter by the model's path finds every kind"
    final = checkpoints[-1]
    scores = lake.scores("grad-dot", model=model_id, checkpoint=final, queries="paraphrased")
    gradients = lake.gradients(model=model_id, checkpoint=final, variant="original")
    assert set(scores["query"].values) <= set(gradients["sample"].values)
    assert set(scores["train"].values) <= set(gradients["sample"].values)  # the same ids: probe-0004, not original:...
    assert [f"original:{t}" for t in scores["train"].values] == list(scores["train_key"].values)
    query = str(scores["query"][0].values)
    assert np.isfinite(float(scores.sel(query=query, train=query)))  # a paraphrase's own original, by the same id


def test_ambiguity_names_the_filters_that_separate_the_hits(demo_lake, rows, checkpoints):
    lake = open_lake(str(demo_lake))
    trained = _row(rows, TRAINED, checkpoints[-1], "original")["path"].split("/")[1]
    olmo, olmo2 = (_row(rows, arch, "checkpoint-0", "original")["path"].split("/")[1] for arch in ("olmo", "olmo2"))
    cases = {
        # asked -> how many hits, and what tells them apart (nothing else)
        (("model", trained), ("variant", "original")): (len(checkpoints), "checkpoint=" + " or ".join(map(repr, checkpoints))),
        (("checkpoint", "checkpoint-0"), ("variant", "original")): (2, f"model={olmo!r} or {olmo2!r}"),
    }
    for asked, (n, apart) in cases.items():
        with pytest.raises(LakeError) as ambiguous:
            lake.gradients(**dict(asked))
        assert str(ambiguous.value).endswith(f"; tell them apart with {apart}")
        assert str(ambiguous.value).startswith(f"{n} gradient groups match")
    with pytest.raises(LakeError) as ambiguous:
        lake.projections(model=trained, checkpoint=checkpoints[-1], variant="original")
    assert str(ambiguous.value).endswith("; tell them apart with kind='rademacher' or 'sparse'; dim=1024 or 8192")
    with pytest.raises(LakeError, match=r"attribution benchmarks match .* tell them apart with checkpoint="):
        lake.attribution(model=trained)


def test_catalog_of_a_lake_that_is_not_there(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(LakeError, match=f"^lake {missing} holds nothing: the directory does not exist$"):
        open_lake(str(missing)).catalog()
    with pytest.raises(LakeError, match="holds nothing: the directory does not exist"):
        open_lake(str(missing)).dataset("probe")
    code, out, err = _cli("catalog", "--lake", str(missing))
    assert (code, out, err) == (2, "", f"error: lake {missing} holds nothing: the directory does not exist\n")
    (tmp_path / "empty").mkdir()
    code, out, err = _cli("catalog", "--lake", str(tmp_path / "empty"))
    assert (code, err) == (0, "")
    assert out == f"lake file://{tmp_path / 'empty'} is empty: no dataset, gradient group or evaluation yet\n"


def test_s3_bucket_that_is_not_there(s3_endpoint):
    with pytest.raises(LakeError) as failed:
        open_lake("s3://no-such-bucket/lake").catalog()
    assert str(failed.value) == (f"lake s3://no-such-bucket/lake holds nothing: the bucket 'no-such-bucket' does not exist "
                                 f"at {s3_endpoint}; check the bucket name and the S3 endpoint")
    assert open_lake("s3://lake/nothing-here-yet").catalog().empty  # an empty prefix is an empty lake


def test_s3_endpoint_that_does_not_answer():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LakeError) as failed:
        open_lake("s3://lake/x", storage_options={"endpoint_url": dead, "key": "AKIATEST", "secret": SECRET}).catalog()
    assert str(failed.value) == (f"cannot reach the S3 endpoint {dead} for s3://lake/x: connection refused; "
                                 "check storage_options['endpoint_url']")
    assert SECRET not in str(failed.value)
    assert failed.value.__suppress_context__ and len("".join(traceback.format_exception(failed.value)).splitlines()) < 25
    env = {"GRADLAKE_S3_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": SECRET}
    code, out, err = _cli("catalog", "--lake", "s3://lake/x", env=env)
    assert (code, out) == (2, "")
    assert err == f"error: cannot reach the S3 endpoint {dead} for s3://lake/x: connection refused; check GRADLAKE_S3_ENDPOINT_URL\n"


def test_s3_without_credentials(s3_endpoint, tmp_path):
    """No AWS_* keys and empty AWS files; run in subprocesses, as s3fs caches a filesystem per process."""
    (tmp_path / "empty").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "empty"), AWS_CONFIG_FILE=str(tmp_path / "empty"),
               AWS_EC2_METADATA_DISABLED="true", GRADLAKE_S3_ENDPOINT_URL=s3_endpoint)  # no instance-metadata probe
    expected = ("no S3 credentials found for s3://lake/x: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE naming a profile in ~/.aws/credentials")
    code, out, err = _cli("catalog", "--lake", "s3://lake/x", env=env, inherit=False)
    assert (code, out, err) == (2, "", f"error: {expected}\n")
    done = subprocess.run([sys.executable, "-c", "from gradlake.lake import open_lake; open_lake('s3://lake/x').catalog()"],
                          env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines[-1] == f"gradlake.lake.store.LakeError: {expected}"
    assert len(lines) < 20 and "During handling" not in done.stderr and "direct cause" not in done.stderr


def test_prefect_server_that_does_not_answer(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/api"
    code, out, err = _cli("watch", "--off", env={"PREFECT_API_URL": dead}, cwd=tmp_path)
    assert (code, out) == (2, "")
    assert err == (f"error: no Prefect server answers at {dead}: connection refused; start one with `prefect server start` "
                   "or unset PREFECT_API_URL\n")


def _cli(*args: str, env: dict | None = None, inherit: bool = True, cwd: Path | None = None) -> tuple[int, str, str]:
    """`gradlake ARGS` in a subprocess: (exit code, stdout, stderr)."""
    done = subprocess.run([GRADLAKE, *args], env={**(os.environ if inherit else {}), **(env or {}), "COLUMNS": "200"},
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert SECRET not in done.stdout + done.stderr, "a credential was printed"
    return done.returncode, done.stdout, done.stderr


# -- issue 30: `gradlake verify` covers every object gradlake writes

GARBAGE = b"garbage, not what gradlake wrote"


def _groups(lake: Path, pattern: str) -> list[str]:
    """Directories (relative to the lake, sorted) holding a zarr.json that match `pattern`."""
    return sorted(str(p.parent.relative_to(lake)) for p in lake.glob(f"{pattern}/zarr.json"))


def _one(lake: Path, pattern: str) -> str:
    """The first file (relative to the lake, sorted) matching `pattern`."""
    found = sorted(str(p.relative_to(lake)) for p in lake.glob(pattern) if p.is_file())
    assert found, f"the demo lake holds no {pattern}"
    return found[0]


def _add_what_the_demo_does_not_write(lake: Path, tiny_models) -> tuple[str, str, str]:
    """A training checkpoint written into a lake prefix, a paraphrase cache entry and a tracing result, each by the
    code that writes it in a real run: (the checkpoint's directory, the cache entry, the tracing result), relative."""
    import pandas as pd

    from gradlake.lake import layout
    from gradlake.lake.results import write_result
    from gradlake.lake.store import LakeStore
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.data.paraphrase import ParaphraseSpec, cache_path, write_cache
    from gradlake.tasks.training.plan import plan_run
    from gradlake.tasks.training.spec import TrainSpec
    from gradlake.tasks.training.train import train

    store = LakeStore(str(lake))
    spec = TrainSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-0", device="cpu"),
                     lake=str(lake), dataset="probe", output=str(lake / "models" / "tiny"), steps=2, batch_size=2,
                     learning_rate=1e-3, checkpoint_every=2, seed=7, quality=None)
    train(plan_run(spec), log=lambda _: None)
    chat = ParaphraseSpec(base_url="http://127.0.0.1:9/v1")
    write_cache(store, chat, "What is the capital of France?", "Which city is France's capital?", served_by="m")
    tracing = layout.tracing_dir("base", "main", "candidate", "main")
    write_result(store, tracing, tables={"results": pd.DataFrame({"statistic": ["cos"], "value": [0.5]})},
                 meta={"lineage": {"candidate": {"model": "candidate"}}, "verdict": "independent"})
    return (_one(lake, "models/tiny/checkpoint-*/manifest.json").rsplit("/", 1)[0],
            cache_path(store, chat, "What is the capital of France?")[len(store.root) + 1:], tracing)


def test_verify_names_one_damaged_object_of_each_kind_in_the_demo_lake(demo_lake, tiny_models, tmp_path):
    """Issue 30's Done-when: in a copy of the demo lake (plus a checkpoint trained into a lake prefix, a paraphrase
    cache entry and a tracing result), one object of every kind gradlake writes is damaged, each in its own group or
    directory; `gradlake verify` exits 1 and names every one, and nothing else."""
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(demo_lake, lake, symlinks=True)
    checkpoint, cache_entry, tracing = _add_what_the_demo_does_not_write(lake, tiny_models)
    stores = _groups(lake, "gradients/*/*/*/*/*-store")
    projections = _groups(lake, "gradients/*/*/*/*/*-proj-*")
    scores = _groups(lake, "attribution/*/*/*/*.*/*")
    evaluations = sorted(str(p.parent.relative_to(lake)) for p in lake.glob("evaluations/*/*/*/*/meta.json"))
    factors = sorted(str(p.parent.relative_to(lake)) for p in lake.glob("influence/**/factors/factors.json"))
    assert len(stores) >= 6 and projections and len(scores) >= 2 and len(evaluations) >= 2 and len(factors) >= 2
    # kind: (object damaged, "delete" or garbage written over it, the row verify reports it in, what that row says)
    damage = {
        "gradient values chunk": (_one(lake, f"{stores[0]}/lm_head.weight/c/**/*"), GARBAGE, stores[0], "lm_head.weight"),
        "input_ids chunk": (_one(lake, f"{stores[1]}/input_ids/c/**/*"), GARBAGE, stores[1], "input_ids"),
        "sample chunk": (_one(lake, f"{stores[2]}/sample/c/**/*"), GARBAGE, stores[2], "sample"),
        "n_tokens chunk": (_one(lake, f"{stores[3]}/n_tokens/c/**/*"), "delete", stores[3], "n_tokens"),
        "completion flag": (_one(lake, f"{stores[4]}/shard_complete/c/**/*"), GARBAGE, stores[4], "completion flag"),
        "group zarr.json": (f"{stores[5]}/zarr.json", "delete", stores[5], "zarr.json is missing"),
        "projection chunk": (_one(lake, f"{projections[0]}/flat/c/**/*"), GARBAGE, projections[0], "flat"),
        "score chunk": (_one(lake, f"{scores[0]}/scores/c/**/*"), "delete", scores[0], "NaN"),
        "score group zarr.json": (f"{scores[1]}/zarr.json", GARBAGE, scores[1], "damaged metadata"),
        "dataset data.parquet": (_one(lake, "datasets/probe/paraphrased/*/data.parquet"), GARBAGE,
                                 _one(lake, "datasets/probe/paraphrased/*/data.parquet").rsplit("/", 1)[0], "data.parquet"),
        "dataset meta.json": (_one(lake, "datasets/probe/model_generated.*/*/meta.json"), GARBAGE,
                              _one(lake, "datasets/probe/model_generated.*/*/meta.json").rsplit("/", 1)[0], "meta.json"),
        "dataset latest.json": ("datasets/probe/original/latest.json", GARBAGE, "datasets/probe/original", "damaged metadata"),
        "evaluation table": (f"{evaluations[0]}/results.parquet", GARBAGE, evaluations[0], "results.parquet"),
        "evaluation meta.json": (f"{evaluations[1]}/meta.json", GARBAGE, evaluations[1], "meta.json"),
        "attribution benchmark table": (_one(lake, "attribution/*/*/*/benchmarks/held_out/benchmark.parquet"), GARBAGE,
                                        _one(lake, "attribution/*/*/*/benchmarks/held_out/benchmark.parquet").rsplit("/", 1)[0],
                                        "benchmark.parquet"),
        "ground-truth losses": (losses := _one(lake, "attribution/*/*/*/groundtruth/*/*/losses/*.parquet"), GARBAGE,
                                losses.rsplit("/", 1)[0], losses.rsplit("/", 1)[1]),
        "factors.json": (f"{factors[0]}/factors.json", GARBAGE, factors[0], "factors.json"),
        "factor file": (factor := _one(lake, f"{factors[1]}/*.safetensors"), GARBAGE, factors[1], factor.rsplit("/", 1)[1]),
        "training checkpoint": (f"{checkpoint}/model.safetensors", GARBAGE, checkpoint, "model.safetensors"),
        "quality answers": (_one(lake, "quality/*/*/*/*/answers.parquet"), GARBAGE,
                            _one(lake, "quality/*/*/*/*/answers.parquet").rsplit("/", 1)[0], "answers.parquet"),
        "training curve": (_one(lake, "evaluations/*/training/*/curve.parquet"), GARBAGE,
                           _one(lake, "evaluations/*/training/*/curve.parquet").rsplit("/", 1)[0], "curve.parquet"),
        "paraphrase cache entry": (cache_entry, b'{"text": "What is', cache_entry.rsplit("/", 1)[0],
                                   cache_entry.rsplit("/", 1)[1]),
        "tracing result": (f"{tracing}/results.parquet", GARBAGE, tracing, "results.parquet"),
        "lake root zarr.json": ("zarr.json", GARBAGE, "zarr.json", "not valid JSON"),
    }
    assert len({target for target, *_ in damage.values()}) == len(damage)  # each a distinct object
    assert len({row for _, _, row, _ in damage.values()}) == len(damage)  # each in its own group or directory
    for target, how, _, _ in damage.values():
        assert (lake / target).is_file(), target
        (lake / target).unlink() if how == "delete" else (lake / target).write_bytes(how)

    code, out, err = _cli("verify", "--lake", str(lake))
    assert code == 1, out + err
    lines = [line for line in (out + err).splitlines() if " damaged " in f" {line} "]
    unnamed = [f"{kind}: {target}" for kind, (target, _, row, says) in damage.items()
               if not any(f" {row}" in line and says in line for line in lines)]
    assert not unnamed, "not named as damaged:\n" + "\n".join(unnamed) + "\nin:\n" + "\n".join(lines)
    rows = [line for line in out.splitlines() if " damaged " in line]  # the table: one row per damaged thing
    assert len(rows) == len(damage) and all(any(f" {row} " in line for line in rows) for _, _, row, _ in damage.values()), out
