"""Probe-set sources: load a Hugging Face dataset or a local file, normalise to chats, sample.

Every source becomes the same table: ``id`` (a stable string) and ``messages`` (a list
of ``{"role", "content"}``).  Rows that cannot be used are dropped and reported with
their reason, never silently.  Accepted row shapes:

- ``messages`` (Tulu-3, UltraChat-200k): a list of role/content dicts;
- ``conversations`` (LIMA): a list of strings, alternating user and assistant;
- a prompt column (``prompt``, ``instruction``, ``question``) and a response column
  (``response``, ``output``, ``answer``, ``completion``).

A text corpus (rows with a ``text`` column, as WikiText) is read with ``blocks``: every
row's text is tokenized by the model's tokenizer, the token streams are concatenated in
source order and cut into blocks of ``block_tokens`` (the tail shorter than a block is
left out), as causal language models are trained on corpora (the Hugging Face language-
modeling example, and Kronfluence's WikiText example after it).  Each block is one
sample, ``block-000000`` onwards, holding the block's decoded text as a single user turn;
render it with the ``text`` chat template and the ``pre`` paradigm to train on every token.
Decoding and tokenizing again can merge tokens differently at a block's edges, so a block
may come back a token or two longer or shorter than ``block_tokens``: the report says how
many blocks tokenize back to exactly their tokens.

A *named source* is one gradlake ships, read wherever gradlake is installed (a worker's disk
included), so no path needs to be known: ``bundled:probe`` is the bundled probe set (160
instruction/answer pairs, each with a ready-made paraphrase in its ``paraphrase`` column), the
same samples and versions as ``gradlake dataset probe`` stores.

The id is the source's own (``id``, ``prompt_id``, ``uid``, ``sample_id``) when it has
one, else ``h-`` and 16 hex digits of a hash of the messages, which survives any
reordering of the source.  A row whose id column holds something that is not a string or
an integer (a list, a mapping, a boolean) or a blank string is dropped and reported: its own
id cannot be kept, and a hash in its place would hide that.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from gradlake.tasks.data.probes import PROBE_FILE

ID_COLUMNS = ("id", "prompt_id", "uid", "sample_id")
PROMPT_COLUMNS = ("prompt", "instruction", "question")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
ROW_SHAPES = ("each row needs a 'messages' list of role/content pairs, a 'conversations' list of strings "
              "(user and assistant alternating), or a prompt column (prompt, instruction, question) and a response "
              "column (response, output, answer, completion), with at least one user and one assistant turn")
READABLE = {".jsonl": "a .jsonl source is UTF-8 text, one JSON object per line",
            ".json": "a .json source is UTF-8 text, one JSON object per line",
            ".parquet": "pass a complete Parquet file, or a .jsonl or .arrow one",
            ".arrow": "pass an Arrow file as `datasets` saves it, or a .jsonl or .parquet one"}


class SourceError(ValueError):
    """A source that cannot be read as asked, with what would be accepted."""


@dataclass(frozen=True)
class NamedSource:
    """A source gradlake ships: its file in the package, and its columns beside the chat."""

    file: str                       # in gradlake.tasks.data
    paraphrase_column: str | None   # ready-made paraphrases of each sample's user turn
    keep_columns: tuple[str, ...]   # carried along by default


BUNDLED_PROBE = "bundled:probe"
NAMED_SOURCES = {BUNDLED_PROBE: NamedSource(PROBE_FILE, paraphrase_column="paraphrase", keep_columns=("topic", "paraphrase"))}
# In the Prefect UI's form a choice between a dropdown of the named sources and free text (an enum,
# not pydantic's `const`, which the form shows as a text box); keep the Literal equal to NAMED_SOURCES' keys.
NamedSourceName = Annotated[Literal["bundled:probe"],
                            WithJsonSchema({"title": "Named source", "type": "string", "enum": list(NAMED_SOURCES)})]
SourceText = Annotated[str, WithJsonSchema({"title": "Hub id or path", "type": "string"})]


def named_source(source: str) -> NamedSource | None:
    """The named source `source` is, or None for a hub id or a path."""
    return NAMED_SOURCES.get(source)


class SourceSpec(BaseModel):
    """Where the samples come from and which of them to take."""

    model_config = ConfigDict(extra="forbid")

    source: NamedSourceName | SourceText = Field(default=BUNDLED_PROBE, description="'bundled:probe' (the probe set bundled with gradlake, paraphrases included: nothing else to fill in), a Hugging Face dataset id (e.g. 'GAIR/lima', 'allenai/tulu-3-sft-mixture'), or a dataset directory or .jsonl / .parquet / .arrow file readable where the flow runs.")
    config: str | None = Field(default=None, description="Dataset configuration (subset) name, for Hugging Face datasets that have several.")
    split: str = Field(default="train", description="Split to read, e.g. 'train', 'test_sft'. Ignored for a single local file.")
    revision: str | None = Field(default=None, description="Hub revision of the dataset (branch, tag, commit).")
    n: int | None = Field(default=None, ge=1, description="Samples to take; empty takes every usable row.")
    sampling: Literal["random", "first"] = Field(default="random", description="'random': n rows drawn with `seed`; 'first': the first n usable rows.")
    seed: int = Field(default=0, description="Seed of the random draw.")
    keep_columns: list[str] = Field(default_factory=list, description="Source columns carried along beside id and messages (e.g. a column of ready-made paraphrases). Empty for a named source: its own ('bundled:probe': topic, paraphrase).")
    blocks: "BlockSpec | None" = Field(default=None, description="Read a text corpus: the rows' text tokenized, concatenated and cut into blocks of tokens, each block a sample (n and sampling then count blocks).")

    @model_validator(mode="after")
    def _split_given(self) -> "SourceSpec":
        if not self.split:
            raise ValueError("split is empty; name one, e.g. 'train'")
        named = named_source(self.source)
        if named is not None:
            if not self.keep_columns:
                self.keep_columns = list(named.keep_columns)
            return self
        path = Path(self.source).expanduser()
        if path.exists():  # lineage names a local source by its absolute path
            self.source = str(path.resolve())
        return self


class BlockSpec(BaseModel):
    """A text corpus cut into blocks of tokens by a model's tokenizer."""

    model_config = ConfigDict(extra="forbid")

    tokenizer: str = Field(description="Model whose tokenizer cuts the text: a Hugging Face id or a local directory (e.g. 'openai-community/gpt2').")
    revision: str | None = Field(default=None, description="Its revision or checkpoint subdirectory.")
    block_tokens: int = Field(default=512, ge=8, description="Tokens per block (Kronfluence's WikiText example: 512).")
    text_column: str = Field(default="text", description="The column holding the text.")


SourceSpec.model_rebuild()


@dataclass
class Loaded:
    """A normalised source: the usable samples and the report of what was dropped."""

    frame: pd.DataFrame
    n_rows: int
    dropped: list[dict] = field(default_factory=list)
    blocks: dict | None = None      # a text corpus cut into blocks: tokens, blocks, what was left out

    def report(self) -> dict:
        reasons: dict[str, int] = {}
        for d in self.dropped:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        return {"rows_read": self.n_rows, "usable": len(self.frame), "dropped": len(self.dropped),
                "dropped_by_reason": reasons, "dropped_ids": [d["id"] for d in self.dropped],
                **({"blocks": self.blocks} if self.blocks else {})}


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES)


def read_rows(spec: SourceSpec) -> pd.DataFrame:
    """The raw rows of the source, as a DataFrame; one clear error if it cannot be read."""
    named = named_source(spec.source)
    if named is not None:
        with resources.as_file(resources.files("gradlake.tasks.data").joinpath(named.file)) as path:
            return _read_jsonl(path)
    path = Path(spec.source).expanduser()
    if _is_local(spec.source) and not path.exists():
        raise SourceError(f"source file {spec.source!r} does not exist; pass a .jsonl, .parquet or .arrow file, "
                          "a local dataset directory, or a Hugging Face dataset id")
    if path.is_file():
        suffix = path.suffix.lower()
        try:
            if suffix in (".jsonl", ".json"):
                return _read_jsonl(path)
            if suffix == ".parquet":
                return pd.read_parquet(path)
            if suffix == ".arrow":
                from datasets import Dataset

                return Dataset.from_file(str(path)).to_pandas()
        except SourceError:
            raise
        except Exception as err:
            detail = " ".join(str(err).split()).rstrip(".")  # one line, whatever the reader's message
            raise SourceError(f"cannot read {spec.source!r} as {suffix[1:]}: {detail}; {READABLE[suffix]}") from err
        raise SourceError(f"source file {spec.source!r} has suffix {suffix!r}; use one of {LOCAL_SUFFIXES}")
    return _load_hub(spec)


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = {"__unparseable__": f"line {number}"}
        rows.append(row if isinstance(row, dict) else {"__unparseable__": f"line {number}"})
    return pd.DataFrame(rows, dtype=object)  # object columns keep each row's own types


def _load_hub(spec: SourceSpec) -> pd.DataFrame:
    import datasets

    try:
        data = datasets.load_dataset(spec.source, spec.config, split=spec.split, revision=spec.revision)
    except ValueError as err:
        if "split" in str(err).lower():
            raise SourceError(f"dataset {spec.source!r} has no split {spec.split!r}: {err}") from err
        raise SourceError(f"cannot load dataset {spec.source!r} (config {spec.config!r}): {err}") from err
    except Exception as err:  # the hub client raises many types for a missing or unreachable dataset
        raise SourceError(
            f"cannot load dataset {spec.source!r} (config {spec.config!r}, split {spec.split!r}): "
            f"{type(err).__name__}: {err}; check the id, or pass a local .jsonl/.parquet/.arrow file"
        ) from err
    return data.to_pandas()


def _message_list(row: dict) -> list[dict] | str:
    """A row's chat, or the reason it has none."""
    if "__unparseable__" in row and isinstance(row["__unparseable__"], str):
        return "not valid JSON"
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, np.ndarray):
            messages = messages.tolist()
        if not isinstance(messages, list):
            return "messages is not a list"
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return "a message is not a {role, content} pair of strings"
            if m["role"] not in ROLES:
                return f"unknown role {m['role']!r}"
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "conversations" in row:
        turns = row["conversations"]
        if isinstance(turns, np.ndarray):
            turns = turns.tolist()
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            return "conversations is not a list of strings"
        return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    prompt = next((c for c in PROMPT_COLUMNS if c in row), None)
    response = next((c for c in RESPONSE_COLUMNS if c in row), None)
    if prompt and response:
        if not isinstance(row[prompt], str) or not isinstance(row[response], str):
            return f"{prompt}/{response} are not strings"
        return [{"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]
    return "no messages, conversations or prompt/response columns"


def _problem(messages: list[dict]) -> str | None:
    if not any(m["role"] == "user" for m in messages):
        return "no user turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    if any(not m["content"].strip() for m in messages):
        return "empty content"
    return None


def _row_id(row: dict, messages) -> tuple[str | None, str | None]:
    """The row's id (its own, else a content hash), and why its own id is unusable when it has one that is."""
    unusable = None
    for column in ID_COLUMNS:
        value = row.get(column)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        if isinstance(value, (str, int, np.integer)) and not isinstance(value, bool) and str(value).strip():
            return str(value), None
        if unusable is None and value is not None:
            kind = "list" if isinstance(value, (list, tuple, np.ndarray)) else type(value).__name__
            unusable = (f"{column} is empty" if isinstance(value, str)
                        else f"{column} is a {kind}, not a string or integer")
    if unusable is None and isinstance(messages, list):
        return "h-" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16], None
    return None, unusable


def _refuse_surrogates(sample_id: str, index: int, fields: dict) -> None:
    """A lone surrogate (a JSON escape such as \\ud800 without its pair) is no character: UTF-8 cannot store it."""
    def strings(value, where):
        if isinstance(value, str):
            yield where, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from strings(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from strings(item, f"{where}[{i}]")

    for name, value in fields.items():
        for where, text in strings(value, name):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise SourceError(f"sample {sample_id[:60]!r} (row {index}) has a lone surrogate U+{ord(text[err.start]):04X} "
                                  f"in {where} at character {err.start}, which UTF-8 cannot store; fix that text in the "
                                  "source (a \\uXXXX escape of half a pair), or drop the row") from None


def normalise(rows: pd.DataFrame, keep_columns: list[str] | tuple[str, ...] = ()) -> Loaded:
    """Rows of any accepted shape as ``id`` + ``messages`` (+ `keep_columns`); unusable rows dropped and reported."""
    missing = [c for c in keep_columns if c not in rows.columns]
    if missing:
        raise SourceError(f"columns {missing} are not in the source; it has {sorted(rows.columns)}")
    kept_ids, kept_messages, kept_extra, dropped, seen = [], [], [], [], set()
    for index, record in enumerate(rows.to_dict(orient="records")):
        # Rows of mixed shapes share one table: a column a row lacks reads as None or NaN.
        row = {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        messages = _message_list(row)
        reason = messages if isinstance(messages, str) else _problem(messages)
        sample_id, id_problem = _row_id(row, messages)
        sample_id = sample_id or f"row-{index}"
        reason = reason or id_problem
        if reason is None and sample_id in seen:
            reason = "duplicate id"
        if reason is None and any(not isinstance(row.get(c), str) or not row[c].strip() for c in keep_columns):
            reason = f"empty or non-text {'/'.join(keep_columns)}"
        if reason is not None:
            dropped.append({"id": sample_id, "row": index, "reason": reason})
            continue
        _refuse_surrogates(sample_id, index, {"id": sample_id, "messages": messages,
                                              **{c: row[c] for c in keep_columns}})
        seen.add(sample_id)
        kept_ids.append(sample_id)
        kept_messages.append(messages)
        kept_extra.append([row[c] for c in keep_columns])
    frame = pd.DataFrame({"id": kept_ids, "messages": kept_messages})
    for i, column in enumerate(keep_columns):
        frame[column] = [extra[i] for extra in kept_extra]
    return Loaded(frame, len(rows), dropped)


def sample(loaded: Loaded, spec: SourceSpec) -> pd.DataFrame:
    """The rows to keep: all, the first n, or n drawn with the seed (kept in source order)."""
    frame = loaded.frame
    if spec.n is None:
        return frame.reset_index(drop=True)
    if spec.n > len(frame):
        raise SourceError(
            f"n={spec.n} is larger than the {len(frame)} usable rows of {spec.source!r} "
            f"({loaded.n_rows} read, {len(loaded.dropped)} dropped); ask for at most {len(frame)}"
        )
    if spec.sampling == "first":
        return frame.head(spec.n).reset_index(drop=True)
    chosen = np.sort(np.random.default_rng(spec.seed).choice(len(frame), size=spec.n, replace=False))
    return frame.iloc[chosen].reset_index(drop=True)


def text_blocks(rows: pd.DataFrame, spec: BlockSpec) -> Loaded:
    """The rows' text as blocks of `block_tokens` tokens: the concatenated token stream, cut; one sample per block."""
    from gradlake.tasks.common.model import ModelSpec, load_tokenizer

    if spec.text_column not in rows.columns:
        raise SourceError(f"blocks read column {spec.text_column!r}, which the source does not have; its columns are "
                          f"{sorted(map(str, rows.columns))}")
    tokenizer = load_tokenizer(ModelSpec(model=spec.tokenizer, checkpoint=spec.revision).resolved())
    texts = [t for t in rows[spec.text_column] if isinstance(t, str)]
    stream: list[int] = []
    for start in range(0, len(texts), 1000):
        for ids in tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"]:
            stream += ids
    size = spec.block_tokens
    n_blocks = len(stream) // size
    if n_blocks == 0:
        raise SourceError(f"the source's {len(texts)} texts hold {len(stream)} tokens, fewer than one block of "
                          f"{size}; lower block_tokens or give more text")
    blocks = [stream[i * size:(i + 1) * size] for i in range(n_blocks)]
    decoded = tokenizer.batch_decode(blocks)
    exact = sum(tokenizer(d, add_special_tokens=False)["input_ids"] == b for d, b in zip(decoded, blocks))
    frame = pd.DataFrame({"id": [f"block-{i:06d}" for i in range(n_blocks)],
                          "messages": [[{"role": "user", "content": d}] for d in decoded]})
    loaded = Loaded(frame, len(rows))
    loaded.blocks = {"tokens": len(stream), "blocks": n_blocks, "left_out_tokens": len(stream) - n_blocks * size,
                     "tokenize_back_exactly": int(exact)}
    return loaded


def load_source(spec: SourceSpec) -> tuple[pd.DataFrame, Loaded]:
    """Read, normalise and sample a source: (the samples, the full normalisation report)."""
    if spec.blocks is not None:
        loaded = text_blocks(read_rows(spec), spec.blocks)
        return sample(loaded, spec), loaded
    loaded = normalise(read_rows(spec), spec.keep_columns)
    if loaded.frame.empty:
        dropped = f"; dropped: {loaded.report()['dropped_by_reason']}" if loaded.dropped else ""
        raise SourceError(f"{spec.source!r} has no usable row ({loaded.n_rows} read{dropped}); {ROW_SHAPES}")
    return sample(loaded, spec), loaded
