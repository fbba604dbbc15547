"""What an attribution benchmark is asked: the training run, the attributed checkpoint, the queries and the ground truth's size."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from gradlake.lake import layout
from gradlake.lake.locations import resolve_benchmark_dir, resolve_ground_truth_dir
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.plan import total_steps
from gradlake.tasks.training.spec import CHECKPOINT_PREFIX, TrainSpec, checkpoint_name


TRAIN_DEPLOYMENT = "train-model/train-model"


HELD_OUT = "held_out"


BEST_TENSOR = "grad-cosine:best-tensor"


class AttributionError(ValueError):
    """Settings that cannot give an attribution benchmark, with what would be accepted."""


class AttributionSpec(BaseModel):
    """The attributed model (a checkpoint of a training run, the final one unless named), its queries, methods and
    ground truth."""

    model_config = ConfigDict(extra="forbid")

    train: TrainSpec = Field(title="Training run", description="The run whose checkpoint is attributed; the ground truth retrains it with only its data changed.")
    checkpoint: str | None = Field(default=None, description="Checkpoint of the run to attribute (e.g. checkpoint-000100); empty: the final one. The retrainings save the run's checkpoints too, so one set of retrainings serves every checkpoint.")
    queries: str = Field(default=HELD_OUT, description="The queries: 'held_out' (samples of the training dataset the run never trained on: the LDS literature's setting), 'paraphrased' or 'model_generated' (made from training samples: fact tracing, with the source oracle), or any variant of `query_dataset`.")
    query_dataset: str | None = Field(default=None, description="Dataset of the queries; empty: the training dataset.")
    query_ids: list[str] | None = Field(default=None, description="Only these query ids, in this order; empty: every sample of the query set (held out: every sample the run did not train on).")
    retrieval_queries: list[str] = Field(default=["paraphrased", "model_generated"], description="Query variants whose retrieval top-1 is reported next to the LDS, for the methods with scores for them in the lake.")
    max_queries: int | None = Field(default=None, ge=2, description="Only the first this many queries; empty: all.")
    methods: list[str] = Field(default=[], description="Score groups (method names) to compare; empty: every one the lake holds for this model, dataset and queries.")
    extraction: str | None = Field(default=None, description="Which extraction's gradients the gradient, projection and TRAK baselines read where a variant holds several (other layers or stored dtype): a gradient group's name as the catalog's `extraction` column lists it (e.g. 'sft-store-L1f0c9a2b'). Empty: the one extraction held for both the training samples and the queries.")
    baselines: bool = Field(default=True, description="First score the gradient, projection, TRAK, BM25 and dense baselines from the lake's groups of the attributed model.")
    trak_lambda: float = Field(default=0.01, gt=0, description="TRAK's ridge: this times the mean diagonal of Phi^T Phi.")
    trak_checkpoints: list[str] | None = Field(default=None, description="TRAK's ensemble: checkpoints of the run whose projected gradients are averaged over; empty: every saved checkpoint after step 0 up to the attributed one that holds the projection.")
    n_subsets: int = Field(default=50, ge=2, description="LDS: random training subsets, each retrained (50 as in the LDS studies, which use 50-100; the demo uses 16).")
    fraction: float = Field(default=0.5, description="LDS: fraction of the training set in each subset, in (0, 1).")
    subset_seed: int = Field(default=0, description="LDS: subset m is numpy's default_rng([seed, m]) choice.")
    retrain_seeds: int = Field(default=1, ge=1, description="LDS: retrainings per subset with different data-order seeds (the run's seed, +1, ...); their query losses are averaged (TRAK and Kronfluence average 5).")
    n_bootstrap: int = Field(default=1000, ge=100, description="Resamples of the subsets behind every interval.")
    best_tensor_folds: int = Field(default=2, ge=2, description="Folds of queries for the cross-fitted best-tensor row: each fold is scored by the tensor chosen on the others.")
    counterfactual_k: int = Field(default=0, ge=0, description="Counterfactual removal: training samples removed per query; 0: skip (unless counterfactual_fraction is set).")
    counterfactual_fraction: float | None = Field(default=None, gt=0, lt=1, description="Counterfactual removal: remove this fraction of the training set per query instead of k (rounded up; 0.01: the top 1%).")
    counterfactual_queries: int | None = Field(default=None, ge=1, description="Counterfactual removal: the first this many queries; empty: all.")
    counterfactual_methods: list[str] = Field(default=["influence-ekfac"], description="Methods whose top-k are removed (one retraining per method and query).")
    random_draws: int = Field(default=10, ge=1, description="Counterfactual removal: retrainings with k random samples removed (the reference).")
    retrain_prefix: str = Field(title="Retraining prefix", description="Directory or s3:// prefix for the retrained models (one subdirectory per run).")
    train_deployment: str | None = Field(default=TRAIN_DEPLOYMENT, description="Deployment that runs each retraining on the gpu pool; empty: in this flow run, one after another.")
    run_timeout_s: float = Field(default=6 * 3600, gt=0, description="Longest one retraining may take once a worker has taken it.")
    worker_wait_s: float = Field(default=900, gt=0, description="How long retrainings may wait while no worker polls their pool.")

    _names = layout.name_fields("queries", "query_dataset", "retrieval_queries", "extraction", "trak_checkpoints")
    _final: tuple[str, int] | None = PrivateAttr(default=None)  # (training spec as JSON, its total steps)

    @model_validator(mode="after")
    def _check(self) -> "AttributionSpec":
        if self.checkpoint is not None:
            checkpoint_step(self.checkpoint)
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"subset fraction {self.fraction} is outside (0, 1); use e.g. 0.5")
        if len(self.train.variants) != 1:
            raise ValueError(f"the ground truth retrains on subsets of one variant; the run trains on {self.train.variants}")
        if self.counterfactual_k and self.counterfactual_fraction:
            raise ValueError(f"give counterfactual_k ({self.counterfactual_k}) or counterfactual_fraction "
                             f"({self.counterfactual_fraction}), not both")
        return self

    @property
    def query_set_dataset(self) -> str:
        return self.query_dataset or self.train.dataset

    def removal_k(self, n_train: int) -> int:
        """Samples removed per query in counterfactual removal (0: none asked)."""
        if self.counterfactual_fraction:
            return max(1, math.ceil(self.counterfactual_fraction * n_train))
        return self.counterfactual_k

    @property
    def model(self) -> ModelSpec:
        """The attributed model: the training run's final checkpoint."""
        return ModelSpec(model=self.train.output, checkpoint=self.checkpoint or checkpoint_name(self._total_steps()),
                         dtype=self.train.model.dtype, device=self.train.model.device)

    @property
    def step(self) -> int:
        """The training step of the attributed checkpoint."""
        return checkpoint_step(self.model.checkpoint)

    def _total_steps(self) -> int:
        """The run's length; its data is read from the lake once per training spec, not on every use of `model`."""
        from gradlake.tasks.training.plan import load_train_data

        if self.train.steps:
            return self.train.steps
        key = self.train.model_dump_json()
        if self._final is None or self._final[0] != key:
            self._final = (key, total_steps(self.train, len(load_train_data(self.train).keys)))
        return self._final[1]


def checkpoint_step(name: str) -> int:
    """The step of a training checkpoint's name (checkpoint-000100 -> 100)."""
    digits = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    if not digits.isdigit():
        raise ValueError(f"checkpoint {name!r} is not a training checkpoint's name; use e.g. {checkpoint_name(100)!r}")
    return int(digits)


def query_variant(spec: AttributionSpec, queries: str | None = None) -> str:
    """The stored variant of a query label: held-out queries are the training variant's own samples."""
    queries = queries or spec.queries
    if queries == HELD_OUT:
        return spec.train.variants[0]
    if queries == "model_generated":
        return layout.generated_variant(*lake_keys(spec.model))
    return queries


def benchmark_label(spec: AttributionSpec) -> str:
    """The benchmark's name under its training dataset: the query label, with the query dataset when it is another."""
    return spec.queries if spec.query_dataset in (None, spec.train.dataset) else f"{spec.query_dataset}.{spec.queries}"


def benchmark_dir(spec: AttributionSpec) -> str:
    """The benchmark's directory in its lake (an earlier lake's location where only that one exists)."""
    return resolve_benchmark_dir(LakeStore(spec.train.lake), *lake_keys(spec.model), spec.train.dataset,
                                 benchmark_label(spec))


def method_path(spec: AttributionSpec, method: str, queries: str | None = None) -> str:
    """A method's score group for the benchmark's queries (or a retrieval variant of the training dataset)."""
    model_key, checkpoint_key = lake_keys(spec.model)
    dataset = spec.query_set_dataset if queries in (None, spec.queries) else spec.train.dataset
    return layout.score_group_path(model_key, checkpoint_key, spec.train.dataset, dataset, query_variant(spec, queries),
                                   method)


def ground_truth_dir(spec: AttributionSpec) -> str:
    """Where the retrained models' query losses and the subsets are recorded (an earlier lake's location where only
    that one exists, so that its stored losses are reused)."""
    return resolve_ground_truth_dir(LakeStore(spec.train.lake), *lake_keys(spec.model), spec.train.dataset,
                                    benchmark_label(spec))
