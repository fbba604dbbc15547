"""The dataset creation flow: originals from a source, paraphrases from an API, the model's own answers."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradlake.lake import layout
from gradlake.lake.datasets import write_dataset
from gradlake.lake.store import LakeStore
from gradlake.lake.store import default_lake
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.data.generate import generate_task
from gradlake.tasks.common.model import ModelSpec, check_model, check_weights, lake_names, load_tokenizer, resolved_commit
from gradlake.tasks.data.paraphrase import ParaphraseSpec, paraphrase_task, prompt_hash, resolve_api_key
from gradlake.tasks.data.sources import SourceSpec, load_source


class DatasetRecipe(BaseModel):
    """How a probe set is made: its source, and which variants to make of it (not where it is stored)."""

    model_config = ConfigDict(extra="forbid")

    source: SourceSpec = Field(title="Source", description="The source and the sampling of it.")
    paraphrase: ParaphraseSpec | None = Field(default=None, title="Paraphrase through an API", description="Make the 'paraphrased' variant: every user turn rewritten by a chat model behind an OpenAI-compatible API.")
    paraphrase_column: str | None = Field(default=None, title="Paraphrase column", description="Instead of an API: a source column that already holds a paraphrase of each sample's (single) user turn, as the bundled probe set has ('paraphrase').")
    generate: list[ModelSpec] = Field(default=[], title="Models that answer", description="Make a 'model_generated' variant per model and checkpoint: the model answers each prompt itself, greedily.")
    generate_from: Literal["paraphrased", "original"] = Field(default="paraphrased", title="Prompts answered", description="Variant whose prompts the models answer: 'paraphrased' (as in the thesis) or 'original'.")
    max_new_tokens: int = Field(default=256, ge=1, title="Longest answer (tokens)", description="Longest generated answer, in tokens.")
    generation_batch_size: int = Field(default=8, ge=1, title="Generation batch size", description="Prompts answered per batch.")

    @model_validator(mode="after")
    def _source_keeps_paraphrases(self) -> "DatasetRecipe":
        if self.paraphrase_column and self.paraphrase_column not in self.source.keep_columns:
            self.source = self.source.model_copy(update={"keep_columns": [*self.source.keep_columns, self.paraphrase_column]})
        return self


class _Named(BaseModel):
    name: str = Field(title="Dataset name", description="Dataset name in the lake, e.g. 'lima', 'tulu3-1000'.")


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


@flow(name="create-dataset", log_prints=True)
def create_dataset(spec: DatasetSpec) -> dict[str, str]:
    """Make and store the requested variants of a probe set; returns variant -> version."""
    check_dataset_spec(spec)
    frame, report = load_source_task(spec.source)
    source_lineage = {**spec.source.model_dump(), "rows_read": report["rows_read"], "dropped": report["dropped"],
                      "dropped_by_reason": report["dropped_by_reason"], "dropped_ids": report["dropped_ids"],
                      **({"blocks": report["blocks"]} if "blocks" in report else {})}
    # The paraphrases come before the first write: the API's answer is where a refused key or an unknown
    # model shows, and a bad paraphrase column fails here too, so a failed check leaves no variant behind.
    paraphrased, paraphraser = None, None
    if spec.paraphrase is not None:
        paraphrased = paraphrase_task(frame, spec.paraphrase, spec.lake)
        settings = spec.paraphrase.model_dump(exclude={"api_key_env", "api_key_block", "system_prompt"})
        paraphraser = {**settings, "prompt_hash": prompt_hash(spec.paraphrase)}
    if spec.paraphrase_column:
        paraphrased, paraphraser = with_user_turn(frame, spec.paraphrase_column), {"column": spec.paraphrase_column}
    stored = {"original": store_variant_task(spec.lake, spec.name, "original", frame, {"source": source_lineage})}
    variants = {"original": frame}
    if paraphrased is not None:
        lineage = {"source": source_lineage, "from_version": stored["original"]["version"], "paraphraser": paraphraser}
        stored["paraphrased"] = store_variant_task(spec.lake, spec.name, "paraphrased", paraphrased, lineage)
        variants["paraphrased"] = paraphrased
    for model in spec.generate:
        model = model.resolved()
        generated = generate_task(variants[spec.generate_from], model, spec.max_new_tokens, spec.generation_batch_size)
        model_name, checkpoint = lake_names(model)
        variant = layout.generated_variant(layout.model_key(model_name, model.is_local), layout.key(checkpoint))
        lineage = {"source": source_lineage, "from_variant": spec.generate_from,
                   "from_version": stored[spec.generate_from]["version"],
                   "generator": {"model": model_name, "checkpoint": checkpoint, "resolved_commit": resolved_commit(model),
                                 "dtype": model.dtype, "decoding": "greedy", "max_new_tokens": spec.max_new_tokens},
                   "empty_answers": int(sum(not m[-1]["content"] for m in generated["messages"]))}
        stored[variant] = store_variant_task(spec.lake, spec.name, variant, generated, lineage)
    return {variant: meta["version"] for variant, meta in stored.items()}
