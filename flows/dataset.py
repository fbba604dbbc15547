"""The dataset creation flow: originals from a source, paraphrases from an API, the model's own answers."""

from __future__ import annotations

from prefect import flow

from gradlake.flows.run_names import named_by
from gradlake.lake import layout
from gradlake.tasks.common.model import lake_names, resolved_commit
from gradlake.tasks.data.dataset import DatasetSpec, check_dataset_spec, load_source_task, store_variant_task, with_user_turn
from gradlake.tasks.data.generate import generate_task
from gradlake.tasks.data.paraphrase import paraphrase_task, prompt_hash


@flow(name="create-dataset", log_prints=True,
      flow_run_name=named_by(DatasetSpec, lambda s: f"dataset {s.name} from {s.source.source}", "create-dataset"))
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
