"""A dataset in the lake: what creates it (a source, its paraphrases, model answers) and the tasks that load and store it."""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradlake.lake import layout
from gradlake.lake.datasets import write_dataset
from gradlake.lake.store import LakeStore, default_lake
from gradlake.tasks.common.model import ModelSpec, check_model, load_tokenizer
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.common.weights import check_weights
from gradlake.tasks.data.paraphrase import ParaphraseSpec, resolve_api_key
from gradlake.tasks.data.sources import SourceSpec, load_source, named_source


class DatasetRecipe(BaseModel):
    """How a probe set is made: its source, and which variants to make of it (not where it is stored)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # a refused API key setting is never shown

    source: SourceSpec = Field(default_factory=SourceSpec, title="Source", description="The source and the sampling of it; by default the probe set bundled with gradlake ('bundled:probe'), all of it, with its paraphrases.")
    paraphrase: ParaphraseSpec | None = Field(default=None, title="Paraphrase through an API", description="Make the 'paraphrased' variant: every user turn rewritten by a chat model behind an OpenAI-compatible API.")
    paraphrase_column: str | None = Field(default=None, title="Paraphrase column", description="Instead of an API: a source column that already holds a paraphrase of each sample's (single) user turn. Empty for a named source that has one ('bundled:probe': 'paraphrase'): it is used unless paraphrase settings are given.")
    generate: list[ModelSpec] = Field(default=[], title="Models that answer", description="Make a 'model_generated' variant per model and checkpoint: the model answers each prompt itself, greedily.")
    generate_from: Literal["paraphrased", "original"] = Field(default="paraphrased", title="Prompts answered", description="Variant whose prompts the models answer: 'paraphrased' (as in the thesis) or 'original'.")
    max_new_tokens: int = Field(default=256, ge=1, title="Longest answer (tokens)", description="Longest generated answer, in tokens.")
    generation_batch_size: int = Field(default=8, ge=1, title="Generation batch size", description="Prompts answered per batch.")

    @model_validator(mode="after")
    def _source_keeps_paraphrases(self) -> "DatasetRecipe":
        named = named_source(self.source.source)
        if named is not None and self.paraphrase is None and not self.paraphrase_column:
            self.paraphrase_column = named.paraphrase_column  # a named source's paraphrases are known: nothing to fill in
        if self.paraphrase_column and self.paraphrase_column not in self.source.keep_columns:
            self.source = self.source.model_copy(update={"keep_columns": [*self.source.keep_columns, self.paraphrase_column]})
        return self


class _Named(BaseModel):
    name: str = Field(title="Dataset name", description="Dataset name in the lake, e.g. 'lima', 'tulu3-1000'.")

    _names = layout.name_fields("name")


class DatasetSpec(DatasetRecipe, _Named):
    """A probe set: its name and lake, where it comes from, and which variants to make of it."""

    lake: str = Field(default_factory=default_lake, title="Lake", description="Lake URL: file:///path, a directory, or s3://bucket/prefix.")


def check_dataset_spec(spec: DatasetSpec) -> None:
    """Everything that can be checked before the source is read or anything is written."""
    layout.name_key("dataset name", spec.name)
    if spec.generate_from not in ("paraphrased", "original"):
        raise ValueError(f"generate_from {spec.generate_from!r} is not known; use 'paraphrased' or 'original'")
    if spec.paraphrase is not None and spec.paraphrase_column:
        raise ValueError("give either paraphrase settings (an API) or paraphrase_column (ready-made paraphrases), not both")
    if spec.generate and spec.generate_from == "paraphrased" and spec.paraphrase is None and not spec.paraphrase_column:
        raise ValueError("generation answers the paraphrased prompts, but no paraphrase settings were given; "
                         "add paraphrase settings or set generate_from='original'")
    for model in spec.generate:
        check_model(model)
        check_weights(model.resolved(), check_model(model), device_here=False)  # files and headers, no weight read
        if load_tokenizer(model.resolved()).chat_template is None:  # or generation would fail after the first writes
            raise ValueError(f"the tokenizer of {model.model!r} has no chat template, so its prompts cannot be rendered "
                             "for generation; generate with a chat model's checkpoint")
    if spec.paraphrase is not None:
        resolve_api_key(spec.paraphrase)  # a missing key is known now; a refused one at the API's first answer
    LakeStore(spec.lake).check_writable()


def with_user_turn(frame, column: str):
    """Chats whose single user turn is replaced by the text in `column`."""
    chats = []
    for sample_id, messages, text in zip(frame["id"], frame["messages"], frame[column]):
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) != 1:
            raise ValueError(f"sample {sample_id!r} has {len(users)} user turns; a paraphrase column fits chats with exactly one")
        chats.append([{**m, "content": text} if i == users[0] else m for i, m in enumerate(messages)])
    return frame.assign(messages=chats)


@task(name="load-source", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_bad_input)
def load_source_task(source: SourceSpec):
    frame, loaded = load_source(source)
    report = loaded.report()
    logger = get_run_logger()
    logger.info("%s: %d rows read, %d usable, %d dropped %s; %d sampled", source.source, report["rows_read"],
                report["usable"], report["dropped"], report["dropped_by_reason"], len(frame))
    if report["dropped"]:
        logger.warning("dropped ids (first 20): %s", report["dropped_ids"][:20])
    if "blocks" in report:
        blocks = report["blocks"]
        logger.info("%d tokens cut into %d blocks of %d (%d tokens in the last, partial block left out); %d of %d "
                    "blocks tokenize back to exactly their tokens", blocks["tokens"], blocks["blocks"],
                    source.blocks.block_tokens, blocks["left_out_tokens"], blocks["tokenize_back_exactly"],
                    blocks["blocks"])
    return frame, report


@task(name="store-variant", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def store_variant_task(lake: str, name: str, variant: str, frame, lineage: dict) -> dict:
    meta = write_dataset(LakeStore(lake), name, variant, frame, lineage)
    get_run_logger().info("stored %s/%s version %s (%d samples)", name, variant, meta["version"], meta["n_samples"])
    return meta
