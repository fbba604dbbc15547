"""What a training run is asked: the base model, the lake data, the schedule and where its checkpoints go."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gradlake.lake import layout
from gradlake.lake.store import refuse_credentials
from gradlake.tasks.common.loss import CHAT_TEMPLATE_HELP, Paradigm
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.data.quality import QualitySpec

Schedule = Literal["constant", "linear", "cosine"]


LINEAGE_FILE = "gradlake_train.json"


STATE_DIR = "trainer_state"


CHECKPOINT_PREFIX = "checkpoint-"


class TrainError(ValueError):
    """A training spec that cannot run, named with what would be accepted."""


class TrainSpec(BaseModel):
    """One training run: base model, lake data, loss, optimizer, schedule, length, seed and checkpoints."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(title="Base model", description="The model and checkpoint training starts from (its dtype is the training dtype).")
    lake: str = Field(title="Lake", description="Lake URL the training data is read from.")
    dataset: str = Field(title="Dataset", description="Dataset in the lake to train on.")
    variants: list[str] = Field(default=["original"], min_length=1, title="Variants", description="Variants of the dataset trained on, together (a sample is 'variant:id').")
    version: str | None = Field(default=None, title="Version", description="Dataset version (one variant only); empty: the latest of each variant.")
    paradigm: Paradigm = Field(default="sft", description="Loss tokens: 'sft' assistant turns only, 'pre' every token (as in extraction).")
    output: str = Field(title="Checkpoint prefix", description="Directory or s3:// prefix that receives the checkpoints (checkpoint-000100, ...).")
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps; empty: `epochs` passes over the data.")
    epochs: int = Field(default=1, ge=1, description="Passes over the data when `steps` is empty.")
    batch_size: int = Field(default=8, ge=1, description="Samples per optimizer step.")
    micro_batch_size: int | None = Field(default=None, ge=1, description="Samples per forward/backward pass (gradient accumulation); empty: the whole batch.")
    learning_rate: float = Field(default=1e-4, json_schema_extra={"exclusiveMinimum": 0}, description="Peak AdamW learning rate (finite, above 0).")
    schedule: Schedule = Field(default="linear", description="Learning-rate decay after warm-up: constant, linear to 0 or cosine to 0.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warm-up from 0 to the peak rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the gradient's global norm to this; empty: no clipping.")
    seed: int = Field(default=0, description="Seeds the data order and torch's RNG.")
    max_length: int = Field(default=512, ge=8, description="Tokens per sample at most (longer chats are cut, as in extraction).")
    checkpoint_every: int = Field(default=0, ge=0, description="Save a checkpoint every this many steps; 0: only the final one.")
    save_steps: list[int] = Field(default=[], description="Further steps to save a checkpoint at (those beyond the run's end are ignored).")
    save_initial: bool = Field(default=False, description="Also save the base model as checkpoint-000000 (step 0).")
    chat_template: str = Field(default="tokenizer", description=CHAT_TEMPLATE_HELP + " The same setting must render the gradients and influence of this model.")
    keep: list[str] | None = Field(default=None, description="Train only on these sample ids (ids as in the dataset; all variants of each).")
    drop: list[str] | None = Field(default=None, description="Train on every sample except these ids.")
    storage_options: dict = Field(default={}, description="fsspec options for an s3:// prefix (no credentials: those come from the environment).")
    quality: QualitySpec | None = Field(default=QualitySpec(), title="Answer quality", description="Score each checkpoint's greedy answers (ROUGE-L, BLEU, optional LLM judge) into the lake; empty: skip.")

    _names = layout.name_fields("dataset", "variants", "version")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data):
        # On the whole settings, not the field: a field's error would show the value given, the secret in it.
        if isinstance(data, dict):
            for name in ("lake", "output"):
                if isinstance(data.get(name), str):
                    refuse_credentials(data[name], name)
        return data

    @field_validator("learning_rate")
    @classmethod
    def _finite_rate(cls, rate: float) -> float:
        # pydantic's gt=0 lets inf through (and says nothing useful of nan): AdamW would write NaN weights.
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"learning rate {rate} is not accepted: give a finite number above 0, such as 1e-4")
        return rate

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.version and len(self.variants) != 1:
            raise ValueError(f"version {self.version!r} names one version of one variant; variants are {self.variants}")
        if self.keep is not None and self.drop is not None:
            raise ValueError("give `keep` or `drop`, not both")
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} exceeds batch_size {self.batch_size}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants {self.variants} repeat a name")
        return self


def hyperparameters(spec: TrainSpec) -> dict:
    """The settings a checkpoint's lineage records as its hyperparameters (beside its base model and data)."""
    return spec.model_dump(mode="json", exclude={"model", "lake", "dataset", "variants", "version", "paradigm", "output",
                                                 "storage_options", "quality"})


def settings(spec: TrainSpec) -> dict:
    """A run's settings as one flat record (base model and data beside the hyperparameters), to say how two runs differ."""
    return {"model": spec.model.model, "checkpoint": spec.model.checkpoint, "dtype": spec.model.dtype,
            "dataset": spec.dataset, "variants": spec.variants, "version": spec.version, "paradigm": spec.paradigm,
            **hyperparameters(spec)}


def checkpoint_name(step: int) -> str:
    """Zero-padded so that name order is step order (the watcher lists checkpoints by name)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"
