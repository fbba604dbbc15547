"""The queries of a benchmark: held-out training samples, or paraphrases and answers made from training samples (each with its source)."""

from __future__ import annotations

from dataclasses import dataclass

from gradlake.lake.store import LakeStore
from gradlake.tasks.attribution.spec import HELD_OUT, AttributionError, AttributionSpec, query_variant


@dataclass
class QuerySet:
    """The benchmark's queries, resolved: where they come from and which training sample each was made from."""

    label: str                      # what the spec asked for: 'held_out', 'paraphrased', a variant name, ...
    dataset: str
    variant: str                    # the stored variant (model_generated resolved to its model and checkpoint)
    ids: list[str]
    chats: list[list[dict]]
    sources: list[int | None]       # position in the training keys of the sample each query was made from

    @property
    def has_sources(self) -> bool:
        return any(s is not None for s in self.sources)


def resolve_queries(spec: AttributionSpec, train_ids: list[str], queries: str | None = None) -> QuerySet:
    """The query set, checked: held-out queries are never training samples; each query's source training sample."""
    from gradlake.lake.datasets import read_dataset

    label = queries or spec.queries
    own = label == spec.queries
    dataset = spec.query_set_dataset if own else spec.train.dataset
    variant = query_variant(spec, label)
    frame = read_dataset(LakeStore(spec.train.lake), dataset, variant)
    chats = {str(i): m for i, m in zip(frame["id"], frame["messages"])}
    trained = set(train_ids)
    asked = spec.query_ids if own else None
    if asked is not None:
        missing = [i for i in asked if i not in chats]
        if missing:
            raise AttributionError(f"query_ids {missing[:5]} are not in dataset {dataset!r} variant {variant!r}; "
                                   f"ids look like {list(chats)[:3]}")
    if label == HELD_OUT:
        if asked is not None:
            overlap = [i for i in asked if i in trained]
            if overlap:
                raise AttributionError(f"held-out query_ids {overlap[:5]} ({len(overlap)} in all) are training samples "
                                       "of the run; held-out queries must be samples it never trained on")
            ids = list(asked)
        else:
            ids = [i for i in chats if i not in trained]
        if not ids:
            raise AttributionError(f"the run trains on every sample of {dataset!r} {variant!r}, so none is held out; "
                                   "train it on part of the dataset (`keep` or `drop`), or choose queries from "
                                   "another variant or dataset")
    else:
        ids = list(asked) if asked is not None else list(chats)
    if spec.max_queries and own:
        ids = ids[: spec.max_queries]
    if own and len(ids) < 2:
        raise AttributionError(f"{len(ids)} queries give no LDS; the query set needs at least 2")
    position = {i: k for k, i in enumerate(train_ids)}
    same_data = dataset == spec.train.dataset and label != HELD_OUT
    sources = [position.get(i) if same_data else None for i in ids]
    return QuerySet(label, dataset, variant, ids, [chats[i] for i in ids], sources)
