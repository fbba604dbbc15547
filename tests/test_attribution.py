"""The attribution benchmark end to end, through Prefect on S3: a tiny OLMo-2 trained from its random initialisation
on half of a probe set until it has learned its answers; held-out and paraphrase queries; influence and baselines
scored; LDS and counterfactual removal from real retraining."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_probe
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.model import ModelSpec

N_DATA, N_TRAIN, N_QUERY = 32, 16, 8
MLP = "model.layers.*.mlp.*.weight"


@pytest.fixture(scope="module")
def trained(tiny_models, s3_endpoint):
    """A tiny OLMo-2 trained on 16 of 32 probe originals until it answers them (checkpoints on S3), with the gradients
    of all 32 originals and of the paraphrases, a projection and EK-FAC influence for both query sets in the S3 lake."""
    from gradlake.flows.extract import extract_gradients
    from gradlake.flows.influence import compute_influence_flow
    from gradlake.flows.train import train_model
    from gradlake.lake.datasets import read_dataset
    from gradlake.tasks.gradients.plan import ExtractionSpec
    from gradlake.tasks.influence.spec import InfluenceSpec
    from gradlake.tasks.projection.spec import ProjectionSpec
    from gradlake.tasks.data.quality import QualitySpec
    from gradlake.tasks.training.spec import TrainSpec

    lake = "s3://lake/attribution-test"
    write_probe(lake, N_DATA)
    ids = [str(i) for i in read_dataset(LakeStore(lake), "probe", "original")["id"]]
    run = TrainSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-0", device="cpu"),
                    lake=lake, dataset="probe", output="s3://lake/attribution-test-run", keep=ids[:N_TRAIN], epochs=50,
                    batch_size=4, learning_rate=1e-2, warmup_steps=4, schedule="cosine", max_length=256, seed=0,
                    quality=QualitySpec(max_samples=8, max_new_tokens=160))
    train_model(run)
    from gradlake.tasks.attribution.spec import AttributionSpec

    model = AttributionSpec(train=run, retrain_prefix="s3://unused").model
    for variant in ("original", "paraphrased"):
        extract_gradients(ExtractionSpec(model=model, dataset="probe", variant=variant, layers=[MLP], max_length=256,
                                         shard_size=N_DATA, batch_size=8, lake=lake,
                                         projections=[ProjectionSpec(dim=64, scope="flat")]))
    common = dict(model=model, lake=lake, dataset="probe", layers=[MLP], max_length=256, strategy="ekfac",
                  train_ids=run.keep)
    compute_influence_flow(InfluenceSpec(**common, queries="original", query_ids=ids[N_TRAIN:N_TRAIN + N_QUERY]))
    compute_influence_flow(InfluenceSpec(**common, queries="paraphrased", max_queries=N_QUERY))
    return run, lake, ids


def test_the_trained_model_has_learned_its_answers(trained):
    from gradlake.tasks.data.quality import read_quality

    run, lake, _ = trained
    quality = read_quality(LakeStore(lake))
    final = quality.sort_values("checkpoint").iloc[-1]
    assert final["rouge_l"] > 0.5, quality[["checkpoint", "rouge_l", "bleu_corpus"]]


def test_held_out_and_paraphrase_benchmarks_through_prefect_on_s3(trained):
    """Held-out queries (the default): no query has a source, the oracle is a random score; paraphrases of training
    samples: the oracle alone reaches a high LDS (duplicate retrieval) and nothing is left of it beyond the source.
    Both tables rest on the same retrainings."""
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.attribution.spec import AttributionSpec
    from gradlake.tasks.attribution.benchmark import read_benchmark

    run, lake, ids = trained
    store = LakeStore(lake)
    common = dict(train=run, max_queries=N_QUERY, n_subsets=12, fraction=0.5, retrain_prefix="s3://lake/attribution-retrain",
                  train_deployment=None)
    held_out = AttributionSpec(**common)
    directory = evaluate_attribution(held_out)
    table = read_benchmark(store, directory).set_index("method")
    print(table.round(3).to_string())
    meta = json.loads(store.fs.cat_file(store.path(f"{directory}/meta.json")))
    assert meta["queries"] == "held_out" and meta["query_ids"] == ids[N_TRAIN:N_TRAIN + N_QUERY]
    assert meta["queries_with_source"] == 0 and not set(meta["query_ids"]) & set(run.keep)
    expected = {"influence-ekfac", "grad-dot", "grad-cosine", "grad-cosine:best-tensor",
                "proj-cosine:rademacher-flat-d64-s0", "trak:rademacher-flat-d64-s0", "bm25", "dense", "random",
                "source oracle"}
    assert expected <= set(table.index), table.index
    assert abs(table.loc["random", "lds"]) < 0.35 and abs(table.loc["source oracle", "lds"]) < 0.35, table["lds"]
    assert "lds_beyond_source" not in table and "top1_held_out" not in table
    # the best tensor: each fold scored by the tensor chosen on the other fold
    folds = meta["best_tensor"]["fold_of_query"]
    assert sorted(set(folds.values())) == [0, 1] and len(meta["best_tensor"]["chosen"]) == 2
    for name in ("report.html", "plots/lds.png", "lds_per_query.parquet"):
        assert store.fs.exists(store.path(f"{directory}/{name}")), name
    report = store.fs.cat_file(store.path(f"{directory}/report.html")).decode()
    assert "held-out samples of the training dataset" in report and "12 subsets of 16 training samples" in report

    paraphrased = AttributionSpec(**common, queries="paraphrased")
    before = _objects(store, "lake/attribution-retrain")
    directory = evaluate_attribution(paraphrased)
    assert _objects(store, "lake/attribution-retrain") == before  # the same retrainings serve every query set
    table = read_benchmark(store, directory).set_index("method")
    print(table.round(3).to_string())
    oracle = table.loc["source oracle"]
    assert oracle["lds"] > 0.6 and oracle["top1_paraphrased"] == 1.0, oracle
    assert abs(oracle["lds_beyond_source"]) < 0.3, oracle
    assert table.loc["influence-ekfac", "lds"] > table.loc["random", "lds"], table["lds"]
    assert table.loc["influence-ekfac", "top1_paraphrased"] >= 0.5
    # adjacent rows are told apart only when the paired interval of their difference excludes 0
    ordered = read_benchmark(store, directory)
    for i in range(len(ordered) - 1):
        row = ordered.iloc[i]
        assert bool(row["separated_from_next"]) == (row["vs_next_low"] > 0 or row["vs_next_high"] < 0)


def _objects(store, prefix):
    store.fs.invalidate_cache()
    return {k: (v["size"], v.get("LastModified")) for k, v in store.fs.find(prefix, detail=True).items()}


def test_trak_features_come_from_the_training_samples_only(trained):
    """TRAK of one checkpoint, written out: phi_q (Phi^T Phi + lambda I)^-1 Phi^T with Phi the projected gradients of
    the run's 16 training samples, never the dataset's other 16 (they would change the Gram matrix); traker's score
    computer divides the inverse by its mean absolute value, and so does the formula here."""
    import zarr

    from gradlake.tasks.attribution.baselines import baseline_context
    from gradlake.tasks.attribution.benchmark import plan_attribution
    from gradlake.lake import layout
    from gradlake.lake.gradient_plan import NOT_GRADIENTS
    from gradlake.lake.scores import ScoreGroup
    from gradlake.tasks.attribution.spec import AttributionSpec, method_path
    from gradlake.tasks.attribution.baselines import baseline_scores
    from gradlake.tasks.common.lineage import lake_keys

    run, lake, ids = trained
    spec = AttributionSpec(train=run, max_queries=N_QUERY, n_subsets=4, retrain_prefix="s3://lake/attribution-retrain",
                           trak_checkpoints=[], retrieval_queries=[])
    plan = plan_attribution.fn(spec)
    baseline_scores(baseline_context(spec, plan), plan["queries"], log=lambda _: None)
    store = LakeStore(lake)
    group = ScoreGroup.open(store, method_path(spec, "trak:rademacher-flat-d64-s0"))
    assert group.meta["settings"]["ensemble"] == [spec.model.checkpoint]
    assert group.train_ids() == [f"original:{i}" for i in run.keep]
    gradients = layout.gradient_group_path(*lake_keys(spec.model), "probe", "original", "sft", "store",
                                           settings=layout.extraction_settings([MLP]))  # named by its layers
    leaf = layout.projection_group_path(gradients, "rademacher-flat-d64-s0")
    features = zarr.open_group(store.zarr_store, path=leaf, mode="r", zarr_format=3)
    rows = {str(s): i for i, s in enumerate(features["sample"][:])}
    arrays = sorted(a for a in features.array_keys() if a not in NOT_GRADIENTS)  # the projected gradient: "flat"
    assert arrays == ["flat"]
    phi = np.concatenate([np.asarray(features[a][:], np.float64) for a in arrays], axis=1)
    train = phi[[rows[i] for i in run.keep]]
    query = phi[[rows[i] for i in group.query_ids()]]

    def trak(train):
        gram = train.T @ train
        inverse = np.linalg.inv(gram + 0.01 * np.diag(gram).mean() * np.eye(len(gram)))
        return query @ (inverse / np.abs(inverse).mean()) @ train.T  # traker scales the inverse by its mean magnitude

    stored = group.read()
    assert np.allclose(stored, trak(train)[:, :N_TRAIN], rtol=2e-3, atol=1e-5 * np.abs(stored).max())
    everything = phi[[rows[i] for i in ids]]  # the Gram matrix of all 32 originals: not what TRAK is
    assert not np.allclose(stored, trak(everything)[:, :N_TRAIN], rtol=2e-3, atol=1e-5 * np.abs(stored).max())


def test_counterfactual_removal_retrains_on_keep_less_the_removed(trained):
    """A run trained on a `keep` subset: each removal retraining trains on exactly those samples less the k removed
    (read back from the retrained checkpoint's lineage), for the attributed run's number of steps."""
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.attribution.spec import AttributionSpec
    from gradlake.tasks.attribution.retraining import counterfactual_runs, retrained_model
    from gradlake.tasks.attribution.benchmark import read_benchmark
    from gradlake.tasks.training.spec import LINEAGE_FILE
    from gradlake.tasks.training.plan import plan_run

    run, lake, ids = trained
    spec = AttributionSpec(train=run, max_queries=N_QUERY, n_subsets=12, counterfactual_k=1, counterfactual_queries=2,
                           random_draws=2, baselines=False, methods=["influence-ekfac"],
                           retrain_prefix="s3://lake/attribution-retrain", train_deployment=None)
    plan = plan_run(run)
    scores = {"influence-ekfac": np.random.default_rng(0).normal(size=(2, N_TRAIN))}
    _, per_method, random, draws = counterfactual_runs(spec, plan.fingerprint, plan.data.ids, plan.saves,
                                                       plan.total_steps, scores)
    removed = ids[int(np.argmax(scores["influence-ekfac"][0]))]
    first = per_method["influence-ekfac"][0]
    assert first.keep == [i for i in run.keep if i != removed] and first.drop is None
    assert retrained_model(first, spec.step, plan.total_steps, N_TRAIN).checkpoint == spec.model.checkpoint
    assert random[0].keep == [i for i in run.keep if i != run.keep[int(draws[0][0])]]
    # and through the flow: the retrained checkpoint's lineage lists what it trained on
    directory = evaluate_attribution(spec)
    table = read_benchmark(LakeStore(lake), directory).set_index("method")
    assert {"cf_loss_change", "cf_vs_random", "cf_source_removed"} <= set(table.columns)
    assert np.isfinite(table.loc["random", "cf_loss_change"])
    store = LakeStore(run.output)
    lineages = store.fs.glob("lake/attribution-retrain/cf-random-*/d000/checkpoint-*/" + LINEAGE_FILE)
    assert lineages
    trained_on = json.loads(store.fs.cat_file(lineages[-1]))
    assert {k.split(":", 1)[1] for k in trained_on["trained_on"]} == set(random[0].keep)
    assert trained_on["step"] == plan.total_steps  # 15 samples in batches of 4: as many steps as the run's 16


@pytest.mark.parametrize("change, message", [
    ({"fraction": 1.0}, "subset fraction 1.0 is outside \\(0, 1\\)"),
    ({"n_subsets": 20000}, "20000 subsets of 8 out of 16 training samples cannot all differ"),
    ({"counterfactual_k": 16}, "counterfactual k=16 out of 16 training samples"),
    ({"counterfactual_k": 15, "random_draws": 17}, "random_draws=17 random removals of 15 out of 16 training samples "
                                                   "cannot all differ \\(only 16 exist\\)"),
    ({"queries": "translated"}, "dataset 'probe' variant 'translated' is not in lake"),
    ({"query_ids": ["probe-0020", "probe-0003", "probe-0005"]},
     "held-out query_ids \\['probe-0003', 'probe-0005'\\] \\(2 in all\\) are training samples of the run"),
    ({"query_ids": ["probe-0020", "probe-9999"]}, "query_ids \\['probe-9999'\\] are not in dataset 'probe'"),
    ({"max_queries": 4, "best_tensor_folds": 5}, "best_tensor_folds=5 with 4 queries leaves a fold with no query"),
    ({"retrain_seeds": 0}, "retrain_seeds\n  Input should be greater than or equal to 1"),
    ({"checkpoint": "checkpoint-000150"}, "saves no checkpoint-000150 \\(its checkpoints: \\['checkpoint-000200'\\]\\)"),
    ({"checkpoint": "final"}, "checkpoint 'final' is not a training checkpoint's name"),
    ({"trak_checkpoints": ["checkpoint-000100"]}, "trak_checkpoints \\['checkpoint-000100'\\] are not checkpoints"),
])
def test_bad_settings_fail_before_any_retraining(trained, change, message):
    from gradlake.tasks.attribution.benchmark import plan_attribution
    from gradlake.tasks.attribution.spec import AttributionSpec

    run, lake, _ = trained
    with pytest.raises(ValueError, match=message):
        plan_attribution.fn(AttributionSpec(**{"train": run, "retrain_prefix": "s3://lake/never", **change}))
    assert not LakeStore("s3://lake/never").fs.exists("lake/never")


def test_held_out_queries_need_samples_the_run_never_saw(trained):
    from gradlake.tasks.attribution.spec import AttributionError, AttributionSpec
    from gradlake.tasks.attribution.queries import resolve_queries

    run, lake, ids = trained
    spec = AttributionSpec(train=run, retrain_prefix="s3://lake/never")
    with pytest.raises(AttributionError, match="the run trains on every sample of 'probe' 'original', so none is held out"):
        resolve_queries(spec, ids)
    queries = resolve_queries(spec, run.keep)
    assert queries.ids == ids[N_TRAIN:] and queries.sources == [None] * (N_DATA - N_TRAIN)
    paraphrased = resolve_queries(spec.model_copy(update={"queries": "paraphrased"}), run.keep)
    assert paraphrased.sources == list(range(N_TRAIN)) + [None] * (N_DATA - N_TRAIN)


def test_queries_tokenized_otherwise_than_the_training_set_are_refused_before_any_write(trained):
    """Query gradients whose lineage names another tokenizer (a checkpoint re-saved with a new one): one error, no scores."""
    import zarr

    from gradlake.tasks.attribution.baselines import baseline_context
    from gradlake.tasks.attribution.benchmark import plan_attribution
    from gradlake.lake import layout
    from gradlake.tasks.attribution.spec import AttributionSpec, method_path
    from gradlake.tasks.attribution.baselines import BaselineError, baseline_scores
    from gradlake.tasks.common.lineage import lake_keys

    run, lake, _ = trained
    spec = AttributionSpec(train=run, queries="paraphrased", max_queries=N_QUERY, retrain_prefix="s3://lake/never")
    store = LakeStore(lake)
    query = layout.gradient_group_path(*lake_keys(spec.model), "probe", "paraphrased", "sft", "store",
                                       settings=layout.extraction_settings([MLP]))
    group = zarr.open_group(store.zarr_store, path=query, mode="r+", zarr_format=3)
    attrs = dict(group.attrs)["gradlake"]
    plan = plan_attribution.fn(spec)
    for method in ("grad-dot", "bm25"):  # what the benchmark test scored; gone, so a write would show
        store.fs.rm(store.path(method_path(spec, method)), recursive=True)
    try:
        group.attrs["gradlake"] = {**attrs, "lineage": {**attrs["lineage"], "tokenizer_hash": "sha256:another"}}
        with pytest.raises(BaselineError, match="were tokenized with different tokenizers .*sha256:another"):
            baseline_scores(baseline_context(spec, plan), plan["queries"], log=lambda _: None)
        for method in ("grad-dot", "bm25"):
            assert not store.fs.exists(store.path(method_path(spec, method)))
    finally:
        group.attrs["gradlake"] = attrs


def test_counterfactual_methods_without_scores_fail_before_any_retraining(trained):
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.attribution.spec import AttributionError, AttributionSpec

    run, lake, _ = trained
    spec = AttributionSpec(train=run, max_queries=N_QUERY, n_subsets=4, counterfactual_k=2, baselines=False,
                           counterfactual_methods=["influence-kfac"], retrain_prefix="s3://lake/cf-never",
                           train_deployment=None)
    with pytest.raises(AttributionError, match=r"counterfactual_methods \['influence-kfac'\] have no scores"):
        evaluate_attribution(spec)
    assert not LakeStore("s3://lake/cf-never").fs.exists("lake/cf-never")


# -- refusals before the first write (no trained model needed) ---------------------------------------------

@pytest.fixture(scope="module")
def base_only(tiny_models, tmp_path_factory):
    """A run whose prefix holds only its base checkpoint (checkpoint-000000): it was never trained."""
    import shutil

    from gradlake.tasks.training.plan import plan_run
    from gradlake.tasks.training.spec import TrainSpec
    from gradlake.tasks.training.train import train

    root = tmp_path_factory.mktemp("base-only")
    lake = str(root / "lake")
    write_probe(lake, 8)
    run = TrainSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-0", device="cpu"), lake=lake,
                    dataset="probe", output=str(root / "run"), keep=[f"probe-{i:04d}" for i in range(1, 5)], steps=2,
                    batch_size=4, save_initial=True, max_length=128, quality=None)
    trained_run = run.model_copy(update={"output": str(root / "trained")})
    for each in (run, trained_run):
        train(plan_run(each), log=lambda _: None)
    shutil.rmtree(root / "run" / "checkpoint-000002")
    return root, run, trained_run


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("trained, change, said", [
    (False, {"checkpoint": "checkpoint-000000"}, "checkpoint-000000 of the run at {output} is its base model, before "
                                                 "any training step: there is no training to attribute; train the run first"),
    (False, {}, "the training run has no checkpoint-000002 at {output} yet (found ['checkpoint-000000']); run train-model"),
    (True, {"checkpoint": "checkpoint-000000"}, "checkpoint-000000 of the run at {output} is its base model"),
    (True, {"queries": "translated"}, "dataset 'probe' variant 'translated' is not in lake"),
])
def test_a_run_never_trained_or_missing_queries_is_refused_before_anything_is_written(base_only, trained, change, said):
    """Attributing the base checkpoint completed and wrote 102 objects; a missing query variant left `retrain` behind."""
    from typer.testing import CliRunner

    from gradlake.flows.cli import app
    from gradlake.tasks.attribution.spec import AttributionSpec

    root, base_run, trained_run = base_only
    run = trained_run if trained else base_run
    spec = AttributionSpec(train=run, n_subsets=4, retrain_prefix=str(root / "retrain"), train_deployment=None, **change)
    before = _files(root)
    result = CliRunner().invoke(app, ["attribution", "--spec", spec.model_dump_json()])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and said.format(output=run.output) in lines[0], result.output
    assert _files(root) == before, _files(root) - before


def test_methods_without_scores_are_refused_before_any_write(base_only):
    """Named methods with no scores and no baselines to make them: refused while planning, nothing written (no
    retrain directory, which the writability probe of the retraining prefix used to leave)."""
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.attribution.spec import AttributionError, AttributionSpec

    root, _, run = base_only
    spec = AttributionSpec(train=run, n_subsets=4, methods=["grad-dot"], baselines=False,
                           retrain_prefix=str(root / "nested" / "retrain"), train_deployment=None)
    before = _files(root)
    with pytest.raises(AttributionError, match=r"no scores in the lake for methods \['grad-dot'\]"):
        evaluate_attribution(spec)
    assert _files(root) == before, _files(root) - before


@pytest.mark.parametrize("how", ["deleted", "damaged"])
def test_a_missing_or_damaged_score_chunk_fails_the_attribution_in_one_line_before_any_retraining(base_only, how):
    """Before: one chunk object of the bm25 scores removed, `gradlake attribution` retrained and exited 0 with the bm25
    row at LDS NaN (0 queries)."""
    import shutil

    from typer.testing import CliRunner

    from gradlake.flows.cli import app
    from gradlake.lake.scores import ScoreGroup
    from gradlake.tasks.attribution.benchmark import plan_benchmark
    from gradlake.tasks.attribution.spec import AttributionSpec, method_path

    root, _, run = base_only
    spec = AttributionSpec(train=run, n_subsets=4, methods=["bm25"], baselines=False,
                           retrain_prefix=str(root / f"retrain-{how}"), train_deployment=None)
    plan = plan_benchmark(spec.model_copy(update={"baselines": True}))  # its queries and training samples
    path = method_path(spec, "bm25")
    group = ScoreGroup.create(LakeStore(run.lake), path, plan["queries"].ids, plan["train_keys"],
                              {"method": "bm25", "kind": "text", "settings": {}}, query_rows=2, train_cols=2)
    group.write_rows(0, np.random.default_rng(0).random((2, len(plan["train_keys"]))))
    group.write_rows(2, np.random.default_rng(1).random((len(plan["queries"].ids) - 2, len(plan["train_keys"]))))
    group.finish()
    chunk = root / "lake" / path / "scores" / "c" / "1" / "0"
    if how == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(np.random.default_rng(2).bytes(chunk.stat().st_size))
    before = _files(root)
    try:
        result = CliRunner().invoke(app, ["attribution", "--spec", spec.model_dump_json()])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert path in lines[0] and "scores/c/1/0" in lines[0] and "gradlake verify --repair" in lines[0], lines[0]
        assert _files(root) == before, _files(root) - before
    finally:
        shutil.rmtree(root / "lake" / path)  # the module's other tests see the lake as it was
