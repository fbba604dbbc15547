"""What an influence computation is asked: model, training and query sets, strategy, damping, and the key of its settings."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gradlake.lake import layout
from gradlake.tasks.common.loss import CHAT_TEMPLATE_HELP, Paradigm, chat_template_text
from gradlake.tasks.common.model import ModelSpec, lake_names


SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRATEGIES: tuple[str, ...] = ("identity", "diagonal", "kfac", "ekfac")
DAMPING_RULES: tuple[str, ...] = ("heuristic", "kronfluence")


# A block's attention or MLP: the submodule right after the block's index ('model.layers.3.self_attn.',
# 'transformer.h.3.attn.', '....3.mlp.'), as OLMo, OLMo-2, Llama, Qwen2 and GPT-2 name them.
LAYER_KEYWORDS: dict[str, re.Pattern] = {"attention": re.compile(r"\.\d+\.(self_attn|attn)\."),
                                         "mlp": re.compile(r"\.\d+\.mlp\.")}


class InfluenceError(ValueError):
    """Influence settings that cannot run, named with what would be accepted."""


class InfluenceSpec(BaseModel):
    """Influence of every training sample on every query, by one Kronfluence strategy."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(title="Model", description="The (trained) model whose influences are computed, at its checkpoint.")
    lake: str = Field(title="Lake", description="Lake URL: the data is read from it and the factors and scores written to it.")
    dataset: str = Field(title="Training dataset", description="Dataset in the lake the model was trained on.")
    train_variants: list[str] = Field(default=["original"], min_length=1, description="Its variants that make the training set (samples 'variant:id').")
    train_ids: list[str] | None = Field(default=None, description="Only these dataset ids are training samples (e.g. the run's `keep`); empty: all.")
    query_dataset: str | None = Field(default=None, description="Dataset of the queries; empty: the training dataset.")
    queries: str = Field(default="paraphrased", description="Variant whose samples are the queries.")
    query_ids: list[str] | None = Field(default=None, description="Only these ids of the query variant are queries, in this order (e.g. samples the run never trained on); empty: all.")
    max_queries: int | None = Field(default=None, ge=1, description="Only the first this many queries (after query_ids); empty: all.")
    paradigm: Paradigm = Field(default="sft", description="Loss tokens: 'sft' assistant turns, 'pre' every token (as in training and extraction).")
    chat_template: str = Field(default="tokenizer", description=CHAT_TEMPLATE_HELP + " As the model was trained.")
    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = Field(default="ekfac", description="Kronfluence's Hessian approximation.")
    layers: list[str] = Field(default=[], description="Tracked nn.Linear modules (GPT-2's Conv1D count as nn.Linear): glob patterns over their weights' names ('model.layers.*.mlp.*.weight'), or the keywords 'attention' and 'mlp' (every Linear in each block's self_attn/attn or mlp). Empty: every nn.Linear.")
    damping: Annotated[float, Field(ge=0)] | Literal["heuristic", "kronfluence"] | None = Field(default=None, description="Damping added to the approximate Hessian: a number >= 0; 'heuristic' or empty: 0.1 x the mean eigenvalue of each module's approximation; 'kronfluence': Kronfluence's own default damping_factor (1e-08 in 1.0.1).")
    empirical_fisher: bool = Field(default=False, description="Fit the covariances with the data's labels (empirical Fisher) instead of labels sampled from the model (true Fisher).")
    max_length: int = Field(default=512, ge=8, description="Tokens per sample at most (as in extraction).")
    train_batch_size: int = Field(default=8, ge=1, description="Training samples per pass (factor fitting and scoring).")
    query_batch_size: int = Field(default=8, ge=1, description="Queries per pass.")
    train_block: int = Field(default=4096, ge=1, description="Training samples per score block: the unit written to the lake and resumed.")
    score_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype of the score computation (half precision as Kronfluence offers it); stored as float32.")
    query_low_rank: int | None = Field(default=None, ge=1, description="Kronfluence's low-rank query gradients (rank); empty: exact.")
    seed: int = Field(default=0, description="Seeds the labels sampled for the true Fisher.")
    method: str | None = Field(default=None, description="Name of the scores in the lake; empty: 'influence-<strategy>'.")

    _names = layout.name_fields("dataset", "train_variants", "query_dataset", "queries")

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value):
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is not one Kronfluence knows; use one of {list(STRATEGIES)}")
        return value

    @field_validator("damping", mode="before")
    @classmethod
    def _damping(cls, value):
        if isinstance(value, str) and value not in DAMPING_RULES:  # a number typed into a form or a CLI: '1e-3'
            try:
                value = float(value)
            except ValueError:
                pass
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None or value in DAMPING_RULES or (number and math.isfinite(value) and value >= 0):
            return value
        raise ValueError(f"damping {value!r} is neither a number >= 0 nor one of {list(DAMPING_RULES)}; use e.g. 0.001, "
                         "'heuristic' (0.1 x the mean eigenvalue) or 'kronfluence' (Kronfluence's default)")

    @field_validator("query_ids")
    @classmethod
    def _query_ids(cls, value):
        if value is not None:
            if not value:
                raise ValueError("query_ids is an empty list: give at least one id, or leave it empty (null) for every query")
            repeated = sorted(i for i, n in Counter(value).items() if n > 1)
            if repeated:
                raise ValueError(f"query_ids repeat {repeated[:5]}: give each id once (a query is one row of scores)")
        return value

    @property
    def method_name(self) -> str:
        return self.method or f"influence-{self.strategy}"


def settings_key(spec: InfluenceSpec, versions: dict, commit: str, converted: list[str] = ()) -> str:
    """A hash of what determines the factors: model and commit, training data, loss, strategy, modules, Fisher.

    `converted`: the tracked modules that are converted Conv1D (only then in the hash, so that keys made before
    the conversion existed stay valid and a GPT-2 fitted on its lm_head alone is not taken for one with blocks).
    """
    what = {"model": list(lake_names(spec.model)), "commit": commit, "dtype": spec.model.dtype, "versions": versions,
            "train_variants": spec.train_variants, "train_ids": spec.train_ids, "paradigm": spec.paradigm,
            "strategy": spec.strategy, "layers": spec.layers, "empirical_fisher": spec.empirical_fisher,
            "max_length": spec.max_length, "seed": spec.seed}
    if converted:
        what["converted_conv1d"] = list(converted)
    if spec.chat_template != "tokenizer":  # keys made before the setting existed stay valid
        what["chat_template"] = hashlib.sha256((chat_template_text(spec.chat_template) or "").encode()).hexdigest()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def damping_factor(spec: InfluenceSpec) -> tuple[str, float | None]:
    """(rule, the damping_factor given to Kronfluence): 'heuristic' -> None (Kronfluence then takes 0.1 x the
    mean eigenvalue per module), 'kronfluence' -> ScoreArguments' default read now, 'value' -> the number given."""
    if spec.damping is None or spec.damping == "heuristic":
        return "heuristic", None
    if spec.damping == "kronfluence":
        from kronfluence.arguments import ScoreArguments

        return "kronfluence", ScoreArguments().damping_factor
    return "value", float(spec.damping)
