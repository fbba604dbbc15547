"""The attribution benchmark end to end, through Prefect on S3: a tiny OLMo-2 trained until it has learned its
answers, influence and baselines scored, LDS and counterfactual removal from real retraining."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import write_probe
from gradlake.lake.store import LakeStore
from gradlake.tasks.model import ModelSpec

N_TRAIN, N_QUERY = 16, 8
MLP = "model.layers.*.mlp.*.weight"


@pytest.fixture(scope="module")
def trained(tiny_models, s3_endpoint):
    """A tiny OLMo-2 trained on 16 probe originals until it answers them (checkpoints on S3), with its gradients, a projection and
    EK-FAC influence in the S3 lake."""
    from gradlake.flows.extract import extract_gradients
    from gradlake.flows.influence import compute_influence_flow
    from gradlake.flows.train import train_model
    from gradlake.tasks.extract import ExtractionSpec
    from gradlake.tasks.influence import InfluenceSpec
    from gradlake.tasks.projection import ProjectionSpec
    from gradlake.tasks.quality import QualitySpec
    from gradlake.tasks.train import TrainSpec

    lake = "s3://lake/attribution-test"
    write_probe(lake, N_TRAIN)
    run = TrainSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1", device="cpu"),
                    lake=lake, dataset="probe", output="s3://lake/attribution-test-run", epochs=50, batch_size=4,
                    learning_rate=1e-2, warmup_steps=4, schedule="cosine", max_length=256, seed=0,
                    quality=QualitySpec(max_samples=8, max_new_tokens=160))
    train_model(run)
    from gradlake.tasks.attribution import AttributionSpec

    model = AttributionSpec(train=run, retrain_prefix="s3://unused").model
    for variant in ("original", "paraphrased"):
        extract_gradients(ExtractionSpec(model=model, dataset="probe", variant=variant, layers=[MLP], max_length=256,
                                         shard_size=N_TRAIN, batch_size=8, lake=lake,
                                         projections=[ProjectionSpec(dim=64, scope="flat")]))
    compute_influence_flow(InfluenceSpec(model=model, lake=lake, dataset="probe", layers=[MLP], max_length=256,
                                         strategy="ekfac", max_queries=N_QUERY))
    return run, lake


def test_the_trained_model_has_learned_its_answers(trained):
    from gradlake.tasks.quality import read_quality

    run, lake = trained
    quality = read_quality(LakeStore(lake))
    final = quality.sort_values("checkpoint").iloc[-1]
    assert final["rouge_l"] > 0.5, quality[["checkpoint", "rouge_l", "bleu_corpus"]]


def test_attribution_benchmark_through_prefect_on_s3(trained):
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.attribution import AttributionSpec, read_benchmark

    run, lake = trained
    spec = AttributionSpec(train=run, max_queries=N_QUERY, n_subsets=12, fraction=0.5, counterfactual_k=3,
                           counterfactual_queries=2, random_draws=2, retrain_prefix="s3://lake/attribution-retrain",
                           train_deployment=None)
    directory = evaluate_attribution(spec)
    store = LakeStore(lake)
    table = read_benchmark(store, directory).set_index("method")
    print(table.round(3).to_string())
    expected = {"influence-ekfac", "grad-dot", "grad-cosine", "proj-cosine:rademacher-flat-d64-s0",
                "trak:rademacher-flat-d64-s0", "bm25", "dense", "random"}
    assert expected <= set(table.index), table.index
    good = table.loc["influence-ekfac"]
    random = table.loc["random"]
    assert abs(random["lds"]) < 0.3, random
    assert good["lds"] > random["lds"] + 0.3 and good["lds_ci_low"] > random["lds_ci_high"], table[["lds", "lds_ci_low", "lds_ci_high"]]
    assert good["cf_loss_change"] > good["cf_random_change"], table[["cf_loss_change", "cf_random_change"]]
    assert good["top1_paraphrased"] >= 0.5
    for name in ("report.html", "plots/lds.png", "plots/lds_vs_top1.png", "plots/counterfactual.png", "lds_per_query.parquet"):
        assert store.fs.exists(store.path(f"{directory}/{name}")), name
    # Asked again, nothing is retrained, no loss or baseline recomputed: every object under the retraining prefix,
    # the ground truth and the score groups is the same object as before (same key, size and modification time).
    def objects(prefix):
        store.fs.invalidate_cache()
        return {k: (v["size"], v.get("LastModified")) for k, v in store.fs.find(prefix, detail=True).items()}

    truth, scores = store.path("groundtruth"), store.path("attribution")  # scores: the baselines are computed once
    before = objects("lake/attribution-retrain"), objects(truth), objects(scores)
    assert len(before[0]) > 12 and len(before[1]) > 12 and len(before[2]) > 12
    again = read_benchmark(store, evaluate_attribution(spec)).set_index("method")
    pd.testing.assert_series_equal(again["lds"], table["lds"])
    assert (objects("lake/attribution-retrain"), objects(truth), objects(scores)) == before
    # and the baselines are not even computed again: they are found in the lake
    from gradlake.tasks.attribution import baseline_scores

    said: list[str] = []
    methods = baseline_scores(spec, log=said.append)
    assert "grad-dot" in methods and "bm25" in methods
    assert said[-1].endswith(f"(computed [], found in the lake {methods})"), said


@pytest.mark.parametrize("change, message", [
    ({"fraction": 1.0}, "subset fraction 1.0 is outside \\(0, 1\\)"),
    ({"n_subsets": 20000}, "20000 subsets of 8 out of 16 training samples cannot all differ"),
    ({"counterfactual_k": 16}, "counterfactual_k=16 out of 16 training samples"),
    ({"queries": "translated"}, "dataset 'probe' variant 'translated' is not in lake"),
    ({"checkpoint": "checkpoint-000150"}, "saves no checkpoint-000150 \\(its checkpoints: \\['checkpoint-000200'\\]\\)"),
    ({"checkpoint": "final"}, "checkpoint 'final' is not a training checkpoint's name"),
])
def test_bad_settings_fail_before_any_retraining(trained, change, message):
    from gradlake.flows.attribution import plan_attribution
    from gradlake.tasks.attribution import AttributionSpec

    run, lake = trained
    with pytest.raises(ValueError, match=message):
        plan_attribution.fn(AttributionSpec(**{"train": run, "retrain_prefix": "s3://lake/never", **change}))
    assert not LakeStore("s3://lake/never").fs.exists("lake/never")


def test_queries_tokenized_otherwise_than_the_training_set_are_refused_before_any_write(trained):
    """Query gradients whose lineage names another tokenizer (a checkpoint re-saved with a new one): one error, no scores."""
    import zarr

    from gradlake.tasks.attribution import AttributionError, AttributionSpec, baseline_scores, method_path
    from gradlake.tasks.evaluate import Evaluation, EvaluationSpec

    run, lake = trained
    spec = AttributionSpec(train=run, queries="paraphrased", retrain_prefix="s3://lake/never")
    store = LakeStore(lake)
    query = Evaluation(EvaluationSpec(model=spec.model, dataset="probe", queries=["paraphrased"], lake=lake),
                       "paraphrased", store).query_dir + "/sft-store"
    group = zarr.open_group(store.zarr_store, path=query, mode="r+", zarr_format=3)
    attrs = dict(group.attrs)["gradlake"]
    for method in ("grad-dot", "bm25"):  # what the benchmark test scored; gone, so a write would show
        store.fs.rm(store.path(method_path(spec, method)), recursive=True)
    try:
        group.attrs["gradlake"] = {**attrs, "lineage": {**attrs["lineage"], "tokenizer_hash": "sha256:another"}}
        with pytest.raises(AttributionError, match="were tokenized with different tokenizers .*sha256:another"):
            baseline_scores(spec, log=lambda _: None)
        for method in ("grad-dot", "bm25"):
            assert not store.fs.exists(store.path(method_path(spec, method)))
    finally:
        group.attrs["gradlake"] = attrs


def test_counterfactual_methods_without_scores_fail_before_any_retraining(trained):
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.attribution import AttributionError, AttributionSpec

    run, lake = trained
    spec = AttributionSpec(train=run, max_queries=N_QUERY, n_subsets=4, counterfactual_k=2, baselines=False,
                           counterfactual_methods=["influence-kfac"], retrain_prefix="s3://lake/cf-never",
                           train_deployment=None)
    with pytest.raises(AttributionError, match=r"counterfactual_methods \['influence-kfac'\] have no scores"):
        evaluate_attribution(spec)
    assert not LakeStore("s3://lake/cf-never").fs.exists("lake/cf-never")
