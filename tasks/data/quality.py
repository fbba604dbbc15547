"""How well a checkpoint answers: its greedy answers against the reference answers, stored in the lake.

Attribution only means something on a model that has learned its data, so every
training checkpoint is measured the same way: the model answers each prompt of a lake
dataset greedily (``tasks/data/generate.py``), and each answer is scored against the dataset's
own assistant turn with

- ROUGE-L F1 (``rouge-score``, the longest common subsequence of words, stemmed),
- BLEU (``sacrebleu``: sentence BLEU per answer with exponential smoothing, and the
  corpus BLEU of all answers), and
- optionally an LLM judge: any OpenAI-compatible chat API (``base_url``) asked for a 0-10
  grade of the answer against the reference.  The key comes from an environment
  variable or a Prefect Secret block, as for paraphrasing; it is never a parameter.

Stored per (model, checkpoint, dataset, variant):

```
<lake>/quality/<model>/<checkpoint>/<dataset>/<variant>/answers.parquet   id, reference, answer, rouge_l, bleu[, judge]
<lake>/quality/<model>/<checkpoint>/<dataset>/<variant>/manifest.json     size and sha256 of both (lake.manifest)
<lake>/quality/<model>/<checkpoint>/<dataset>/<variant>/summary.json      means, corpus BLEU, settings, lineage
```

``summary.json`` is written last and marks a complete result; the manifest, written just before it,
covers both files, so `gradlake verify` checks them and a reader names a damaged one in one line.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake import layout
from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.manifest import entry, write_manifest
from gradlake.lake.results import read_checked_file, read_parquet_bytes, read_result_meta
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.data.paraphrase import ChatAPI


JUDGE_SYSTEM_PROMPT = (
    "You grade answers. You are given a question, a reference answer and an answer to grade. "
    "Reply with one integer from 0 (wrong or unrelated) to 10 (says everything the reference says, correctly), "
    "and nothing else."
)


class JudgeSpec(ChatAPI):
    """An LLM judge behind an OpenAI-compatible API (its key from the environment or a Prefect Secret block)."""


class QualitySpec(BaseModel):
    """Which prompts a checkpoint answers, and how the answers are scored."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # a refused API key setting is never shown

    variant: str = Field(default="original", description="Dataset variant whose prompts are answered and whose answers are the references.")
    max_samples: int | None = Field(default=64, ge=1, description="Answer only the first this many samples; empty: all.")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens generated per answer at most.")
    batch_size: int = Field(default=8, ge=1, description="Prompts generated together.")
    judge: JudgeSpec | None = Field(default=None, description="An LLM judge; empty: ROUGE-L and BLEU only.")

    _names = layout.name_fields("variant")


def reference_answer(messages: list[dict]) -> str:
    """The last assistant turn of a chat: what the model should have said."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise ValueError("a chat without an assistant turn has no reference answer")
    return answers[-1]


def overlap_scores(references: list[str], answers: list[str]) -> tuple[list[float], list[float], float]:
    """(ROUGE-L F1 per answer, sentence BLEU per answer, corpus BLEU), BLEU on sacrebleu's 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(references, answers)]
    bleu = [sacrebleu.sentence_bleu(a, [r], smooth_method="exp").score for r, a in zip(references, answers)]
    corpus = sacrebleu.corpus_bleu(answers, [references]).score
    return rouge, bleu, corpus


def parse_grade(text: str) -> float:
    """The first integer 0-10 in a judge's reply; NaN when there is none."""
    match = re.search(r"\b(10|[0-9])\b", text or "")
    return float(match.group(1)) if match else float("nan")


def judge_answers(spec: JudgeSpec, questions: list[str], references: list[str], answers: list[str]) -> list[float]:
    """A 0-10 grade per answer from the judge (NaN where its reply holds no grade)."""
    import openai

    from gradlake.tasks.data.paraphrase import resolve_api_key, resolved_base_url

    client = openai.OpenAI(api_key=resolve_api_key(spec), base_url=resolved_base_url(spec),
                           max_retries=spec.max_retries, timeout=spec.timeout_s)
    grades = []
    for question, reference, answer in zip(questions, references, answers):
        reply = client.chat.completions.create(
            model=spec.model, temperature=0, seed=0,
            messages=[{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                      {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{reference}\n\n"
                                                  f"Answer to grade:\n{answer}"}])
        grades.append(parse_grade(reply.choices[0].message.content))
    return grades


def measure_quality(model, tokenizer, frame: pd.DataFrame, spec: QualitySpec, log=print) -> tuple[pd.DataFrame, dict]:
    """Answer the prompts of `frame` greedily and score them: (per-answer table, summary)."""
    from gradlake.tasks.data.generate import generate_answers, prompt_messages

    frame = frame.head(spec.max_samples) if spec.max_samples else frame
    references = [reference_answer(m) for m in frame["messages"]]
    generated = generate_answers(model, tokenizer, frame, spec.max_new_tokens, spec.batch_size, log=log)
    answers = [reference_answer(m) for m in generated["messages"]]
    rouge, bleu, corpus = overlap_scores(references, answers)
    table = pd.DataFrame({"id": frame["id"].astype(str).values, "reference": references, "answer": answers,
                          "rouge_l": rouge, "bleu": bleu})
    summary = {"n": len(table), "rouge_l": float(table["rouge_l"].mean()), "bleu_sentence_mean": float(table["bleu"].mean()),
               "bleu_corpus": float(corpus), "exact_match": float((table["answer"] == table["reference"]).mean())}
    if spec.judge is not None:
        questions = [prompt_messages(m)[-1]["content"] for m in frame["messages"]]
        table["judge"] = judge_answers(spec.judge, questions, references, answers)
        summary["judge_mean"] = float(table["judge"].mean())
        summary["judge_model"] = spec.judge.model
    return table, summary


ANSWERS, SUMMARY = "answers.parquet", "summary.json"


def write_quality(store: LakeStore, model_key: str, checkpoint_key: str, dataset: str, variant: str,
                  table: pd.DataFrame, summary: dict) -> str:
    """Store the per-answer table, its manifest, then the summary (written last: its presence means complete)."""
    base = store.path(layout.quality_dir(model_key, checkpoint_key, dataset, variant))
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    record = {**summary, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    files = {ANSWERS: buffer.getvalue(), SUMMARY: json.dumps(record, indent=1).encode()}
    store.fs.makedirs(base, exist_ok=True)
    if store.fs.exists(f"{base}/{SUMMARY}"):  # a rerun: not complete again until its own summary is written
        store.fs.rm_file(f"{base}/{SUMMARY}")
    store.fs.pipe_file(f"{base}/{ANSWERS}", files[ANSWERS])
    write_manifest(store.fs, base, {name: entry(data) for name, data in files.items()})
    store.fs.pipe_file(f"{base}/{SUMMARY}", files[SUMMARY])
    return base


def read_summary(store: LakeStore, directory: str) -> dict | None:
    """The summary of the quality result at `directory` (`layout.quality_dir`), None where there is none yet;
    one LakeError naming ``summary.json`` if it is damaged."""
    if not store.fs.exists(store.path(f"{directory}/{SUMMARY}")):  # not measured, or its run is not done yet
        return None
    return read_result_meta(store, directory, "quality result", name=SUMMARY)


def read_answers(store: LakeStore, directory: str) -> pd.DataFrame:
    """The scored answers of the quality result at `directory`; one LakeError naming ``answers.parquet`` if damaged."""
    raw = read_checked_file(store, directory, ANSWERS)
    if raw is None:
        raise LakeError(f"no answers at {directory!r} in {store.url}: measure that checkpoint's quality again")
    return read_parquet_bytes(store, f"{directory}/{ANSWERS}", raw)


def read_quality(store: LakeStore) -> pd.DataFrame:
    """Every stored summary, one row per (model, checkpoint, dataset, variant); a damaged one is one LakeError."""
    rows = []
    for path in store.glob(f"{layout.QUALITY}/{SUMMARY}"):
        model_key, checkpoint_key, dataset, variant = path.split("/")[-5:-1]
        directory = layout.quality_dir(model_key, checkpoint_key, dataset, variant)
        rows.append({"model": model_key, "checkpoint": checkpoint_key, "dataset": dataset, "variant": variant,
                     **(read_summary(store, directory) or {})})
    return pd.DataFrame(rows)


def checkpoint_quality(store: LakeStore, model_key: str, checkpoint_key: str, dataset: str, spec: QualitySpec,
                       model, tokenizer, lineage: dict, log=print) -> dict:
    """Measure one checkpoint on a lake dataset and store the result; returns the summary."""
    meta = dataset_meta(store, dataset, spec.variant)
    frame = read_dataset(store, dataset, spec.variant, meta["version"])
    table, summary = measure_quality(model, tokenizer, frame, spec, log=log)
    summary.update(dataset_version=meta["version"], settings=spec.model_dump(mode="json"), lineage=lineage)
    write_quality(store, model_key, checkpoint_key, dataset, spec.variant, table, summary)
    return summary

