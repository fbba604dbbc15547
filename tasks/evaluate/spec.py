"""What a select-vs-project evaluation is asked: model, dataset, query variants, similarities, and where its results go."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gradlake.lake import layout
from gradlake.lake.store import default_lake
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.evaluate.similarity import DEFAULT_BUDGET


SIMILARITIES = ("cosine", "dot")


class EvaluationSpec(BaseModel):
    """Which extraction to evaluate, against which query variants."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(description="The model and checkpoint whose gradients are evaluated (as given to the extraction).")
    dataset: str = Field(default="probe", description="Dataset name in the lake.")
    queries: list[str] = Field(default=["paraphrased", "model_generated"], description="Query variants compared with 'original'; 'model_generated' means this model and checkpoint's answers.")
    paradigm: Literal["sft", "pre"] = Field(default="sft", description="Paradigm of the gradient groups ('sft' or 'pre').")
    target: Literal["parameters", "inputs_embeds", "inputs_embeds_mean"] = Field(default="parameters", description="Which extraction target's groups to evaluate: the weights ('parameters') or the input embeddings, per token or mean-pooled; each target's results go to a directory of its own.")
    extraction: str | None = Field(default=None, description="Which extraction to evaluate where a variant holds several (other layers or stored dtype): its gradient group's name as the catalog's `extraction` column lists it (e.g. 'sft-store-L1f0c9a2b'), or that name's settings part ('L1f0c9a2b'). Empty: the one extraction held for both the originals and the queries. A named extraction's results go to a directory of their own.")
    layers: list[str] | None = Field(default=None, description="Or pick the extraction by its layer patterns, exactly as given to the extraction (the one of every parameter: extraction '<stem>-store'). Empty: any.")
    dense_baseline: bool = Field(default=True, description="Also rank by a sentence-embedding model on the user turn (all-MiniLM-L6-v2).")
    greedy_steps: int = Field(default=8, ge=0, description="Steps of greedy layer selection (0: none).")
    bm25: Literal["lucene", "thesis"] = Field(default="lucene", title="BM25 protocol", description="'lucene': bm25s's Lucene BM25 over the user turns, Unicode words, candidates and ties in a fixed order (a tie is not a hit). 'thesis': the 'Select or Project?' thesis's choices: rank_bm25's Okapi on words split at single spaces over each sample's first message, numpy's default sort order for the candidates, a tie in the final choice going to the candidate BM25 ranked higher. Written beside the default evaluation (in sft-thesis or pre-thesis), never over it.")
    memory_budget: int = Field(default=DEFAULT_BUDGET, ge=1 << 20, title="Memory budget (bytes)", description="Bytes of gradient slabs and score blocks held at once.")
    lake: str = Field(default_factory=default_lake, description="Lake URL.")

    _names = layout.name_fields("dataset", "queries", "extraction")

    # Checked with the spec, so that the CLI and the Prefect UI refuse it at once: an 'original' query
    # opens fine (it is the originals' own group) and was found only inside the run.
    @field_validator("queries")
    @classmethod
    def _queries(cls, value: list[str]) -> list[str]:
        check_queries(value)
        return value


def check_queries(queries: list[str]) -> None:
    """One or more distinct query variants, 'original' not among them (it is what they are compared with)."""
    if not queries or len(set(queries)) < len(queries):
        raise ValueError(f"query variants {queries} must be one or more distinct names, e.g. ['paraphrased', 'model_generated']")
    if "original" in queries:
        raise ValueError("'original' is what queries are compared against; it cannot be a query variant "
                         "(use 'paraphrased', 'model_generated' or another variant of the dataset)")


def evaluation_subdir(spec: "EvaluationSpec", original_group: str | None = None) -> str:
    """The groups' stem (paradigm and target), the settings of the evaluated extraction where they name its group
    (`original_group`, the originals' group path), and '-thesis' for the thesis's BM25 protocol, so that none
    replaces another (``lake.layout.evaluation_name``)."""
    stem = layout.stem(spec.paradigm, spec.target)
    leaf = (original_group or f"{stem}-store").rsplit("/", 1)[-1]
    return layout.evaluation_name(stem, leaf.removeprefix(f"{stem}-store").lstrip("-"), thesis=spec.bm25 == "thesis")
