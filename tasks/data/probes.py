"""The bundled probe set: instruction/answer pairs written for gradlake, each with a paraphrase.

It lets the demo and the tests run offline.  Variants share sample ids, so a
paraphrased sample can be matched to its original.
"""

from __future__ import annotations

import json
from importlib import resources

import pandas as pd

PROBE_FILE = "probe_set.jsonl"
PROBE_VARIANTS = ("original", "paraphrased")


def load_probe_set() -> pd.DataFrame:
    """The bundled rows: id, topic, instruction, answer, paraphrase."""
    text = resources.files("gradlake.tasks.data").joinpath(PROBE_FILE).read_text(encoding="utf-8")
    return pd.DataFrame([json.loads(line) for line in text.splitlines() if line.strip()])


def probe_variant(frame: pd.DataFrame, variant: str) -> pd.DataFrame:
    """One variant as chats: ``original`` asks the instruction, ``paraphrased`` its paraphrase."""
    if variant not in PROBE_VARIANTS:
        raise ValueError(f"the bundled probe set has variants {PROBE_VARIANTS}, not {variant!r}")
    prompt = frame["instruction"] if variant == "original" else frame["paraphrase"]
    messages = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        for p, a in zip(prompt, frame["answer"])
    ]
    return pd.DataFrame({"id": frame["id"].astype(str), "messages": messages, "topic": frame["topic"]})


def store_probe_set(lake: str, name: str = "probe", n: int | None = None) -> list[str]:
    """Write the bundled probe set's variants (optionally its first n rows) into a lake."""
    from gradlake.lake.datasets import write_dataset
    from gradlake.lake.store import LakeStore

    store = LakeStore(lake)
    store.check_writable()
    frame = load_probe_set()
    if n is not None:
        frame = frame.head(n)
    for variant in PROBE_VARIANTS:
        # The lineage names the file where it first lived: lakes written since then must keep their versions.
        write_dataset(store, name, variant, probe_variant(frame, variant),
                      lineage={"source": "gradlake bundled probe set (tasks/probe_set.jsonl)", "variant": variant})
    return list(PROBE_VARIANTS)
