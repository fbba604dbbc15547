"""A published attribution protocol as one spec: datasets, training, influence and the benchmark, with its cost before any work."""

from __future__ import annotations

import math

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradlake.tasks.attribution.spec import AttributionSpec
from gradlake.tasks.data.dataset import DatasetSpec
from gradlake.tasks.influence.spec import InfluenceSpec


LAKE_FIELDS = ("datasets", "influence")


INFLUENCE_DEPLOYMENT = "compute-influence/compute-influence"


class ProtocolSpec(BaseModel):
    """Every stage of one attribution study: datasets, training, influence, the benchmark against retraining."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A short name of the protocol.")
    reference: str = Field(default="", description="Where the protocol is published (paper, repository path).")
    lake: str = Field(title="Lake", description="Lake URL every stage reads and writes (it fills each stage's lake).")
    datasets: list[DatasetSpec] = Field(default=[], description="Datasets created first (training and query sets).")
    attribution: AttributionSpec = Field(description="The benchmark; its `train` is the training run of the study.")
    influence: list[InfluenceSpec] = Field(default=[], description="Influence scores computed on the attributed checkpoint before the benchmark.")
    sustained_tflops: float = Field(default=50.0, gt=0, description="Throughput the cost estimate assumes per GPU, in TFLOP/s sustained (50: float32 on an H100 at about 75% of its 67 TFLOP/s).")

    @model_validator(mode="before")
    @classmethod
    def _one_lake(cls, data):
        """The protocol's lake fills every stage's lake, so a protocol file names none."""
        if isinstance(data, dict) and data.get("lake"):
            lake = data["lake"]
            data = dict(data)
            for key in LAKE_FIELDS:
                data[key] = [{**item, "lake": lake} if isinstance(item, dict) else item for item in data.get(key, [])]
            attribution = data.get("attribution")
            if isinstance(attribution, dict) and isinstance(attribution.get("train"), dict):
                train = {**attribution["train"], "lake": lake}
                data["attribution"] = {**attribution, "train": train}
                # influence runs on the attributed checkpoint (set when the run is known) of the run's own data
                data["influence"] = [{"model": {"model": train.get("output", "")}, "dataset": train.get("dataset"),
                                      "train_ids": train.get("keep"), **item} if isinstance(item, dict) else item
                                     for item in data["influence"]]
        return data


def n_parameters(model) -> int:
    """Parameters of a model from its config alone (built on the meta device: nothing is loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.common.model import check_model

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(check_model(model))
    return sum(p.numel() for p in skeleton.parameters())


def mean_tokens(plan, sample: int = 256) -> float:
    """Mean tokens per training sample as the run renders them (the first `sample` samples, capped at max_length)."""
    from gradlake.tasks.common.loss import chat_template_text, encode_sample
    from gradlake.tasks.common.model import load_tokenizer

    spec = plan.spec
    tokenizer = load_tokenizer(spec.model.resolved())
    template = chat_template_text(spec.chat_template)
    lengths = [len(encode_sample(tokenizer, chat, spec.paradigm, spec.max_length, template).input_ids)
               for chat in plan.data.chats[:sample]]
    return sum(lengths) / len(lengths)


def protocol_cost(spec: ProtocolSpec) -> dict:
    """What the study costs in training FLOPs (6 x parameters x tokens per run) and GPU-hours at the assumed rate.

    Counted: the training run, every LDS retraining (subsets x seeds, each on `fraction` of the
    samples for as many epochs), every counterfactual retraining, and each influence run as
    three passes over the training set (Kronfluence fits covariances and eigenvalue
    corrections in one pass each, then scores in a third); forward passes for query losses are
    left out (under 1% here).  Loading and checkpoint writes add a fixed time per run.
    """
    from gradlake.tasks.training.plan import plan_run

    attribution = spec.attribution
    plan = plan_run(attribution.train)
    params = n_parameters(attribution.train.model)
    n_train = len(plan.data.keys)
    train = attribution.train
    samples = n_train * train.epochs if train.steps is None else train.steps * train.batch_size
    tokens = samples * mean_tokens(plan)
    runs = {"training": 1.0,
            "lds retrainings": attribution.n_subsets * attribution.retrain_seeds * attribution.fraction}
    k = attribution.removal_k(n_train)
    if k:
        queries = attribution.counterfactual_queries or 0
        runs["counterfactual retrainings"] = (queries * len(attribution.counterfactual_methods) + attribution.random_draws
                                              if queries else float("nan"))
    runs["influence"] = 3.0 * len(spec.influence)
    flops = {what: 6.0 * params * tokens * n for what, n in runs.items()}
    total = sum(v for v in flops.values() if not math.isnan(v))
    return {"parameters": params, "training_samples": n_train, "tokens_per_run": tokens,
            "retrainings": attribution.n_subsets * attribution.retrain_seeds, "flops": flops, "total_flops": total,
            "gpu_hours": total / (spec.sustained_tflops * 1e12) / 3600, "sustained_tflops": spec.sustained_tflops}


def describe_cost(cost: dict) -> str:
    parts = ", ".join(f"{what} {value:.2e}" for what, value in cost["flops"].items() if not math.isnan(value))
    return (f"{cost['parameters'] / 1e6:.1f}M parameters, {cost['training_samples']} training samples, "
            f"{cost['tokens_per_run'] / 1e6:.2f}M tokens per full run, {cost['retrainings']} LDS retrainings; FLOPs: "
            f"{parts}; total {cost['total_flops']:.2e} = about {cost['gpu_hours']:.2g} GPU-hours at "
            f"{cost['sustained_tflops']:.0f} TFLOP/s sustained, plus loading and checkpoint writes per run")


def check_influence_layers(spec: ProtocolSpec) -> None:
    """Each influence run's layers chosen on the base model's architecture (GPT-2's Conv1D counted as nn.Linear), so
    a pattern that matches nothing fails before any training."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.common.model import check_model
    from gradlake.tasks.influence.kronfluence import linear_from_conv1d, tracked_modules

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(check_model(spec.attribution.train.model))
    linear_from_conv1d(skeleton)
    for influence in spec.influence:
        tracked_modules(skeleton, influence.layers)


@task(name="plan-protocol", cache_policy=NONE)
def plan_protocol_task(spec: ProtocolSpec) -> dict:
    check_influence_layers(spec)
    cost = protocol_cost(spec)
    get_run_logger().info("protocol %s: %s", spec.name, describe_cost(cost))
    return cost
