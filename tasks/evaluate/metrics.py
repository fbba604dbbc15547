"""Retrieval metrics: how well a query's vector finds its own original among all originals.

Everything here works on one block of queries at a time: ``scores`` is (queries x
originals), ``truth`` the column of each query's own original.  Ties count half: the
rank of the true original is 1 + (originals scoring higher) + (others scoring equal) / 2,
so that a constant similarity ranks the truth in the middle rather than first.

The thesis protocol ("Select or Project?"): each query's candidates are the 5 originals
BM25 ranks highest for its user turn, with the true original forced in (replacing the
lowest-ranked candidate) when BM25 missed it; the query counts as correct when the true
original has the strictly highest similarity among its candidates.

``bm25: thesis`` reproduces the thesis's own choices instead (`thesis_bm25_scores`,
`thesis_candidates`, ties ``"first"``): Okapi BM25 on words split at single spaces, over
each sample's first message, candidates in numpy's default (unstable) sort order, and a
tie in the final choice going to the candidate BM25 ranked higher.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np


RECALL_AT = (1, 5, 10)
CANDIDATES = 5


def true_ranks(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true original among all originals (ties count half)."""
    rows = np.arange(scores.shape[0])
    own = scores[rows, truth][:, None]
    higher = (scores > own).sum(axis=1)
    equal = (scores == own).sum(axis=1) - 1
    return 1.0 + higher + equal / 2.0


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy, recall@k, mean reciprocal rank and mean rank from the true originals' ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"top1": float(np.mean(ranks == 1))}
    out.update({f"recall@{k}": float(np.mean(ranks <= k)) for k in RECALL_AT})
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of each query's k best originals, best first (ties by lower index)."""
    index = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: equal scores keep index order
    return index, np.take_along_axis(scores, index, axis=1)


TIES = ("strict", "first")


def candidate_correct(scores_at_candidates: np.ndarray, truth_position: np.ndarray, ties: str = "strict") -> np.ndarray:
    """Per query: does the true original score strictly highest among its candidates?

    ``ties="first"`` (the thesis's choice, the first best candidate in BM25's order): correct
    when the truth scores above every candidate before it and at least as high as those after it."""
    if ties not in TIES:
        raise ValueError(f"tie rule {ties!r} is not known; use one of {TIES}")
    if ties == "first":
        return np.argmax(scores_at_candidates, axis=1) == truth_position
    rows = np.arange(scores_at_candidates.shape[0])
    own = scores_at_candidates[rows, truth_position]
    others = scores_at_candidates.copy()
    others[rows, truth_position] = -np.inf
    return own > others.max(axis=1)


# -- BM25 --------------------------------------------------------------------------------------------

# Han ideographs and kana: one token per character (no spaces separate their words), as Lucene's
# standard tokenizer does; any other run of letters and digits, in any script, is a word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def bm25_tokens(text: str) -> list[str]:
    """Case-folded words of letters and digits in any script, each Han or kana character on its own
    (NFKC first, so that composed and decomposed accents agree): the tokenisation BM25 uses here (no
    stemming, no stop words).  On ASCII text these are the runs of ``[a-z0-9]`` of the lower-cased text."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def bm25_scores(queries: list[str], documents: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 of every query against every document (queries x documents), through ``bm25s``.

    Lucene's variant: sum over query words (a repeated word counts again) of
    idf * tf / (tf + k1 (1 - b + b |d| / avgdl)), idf = ln(1 + (N - df + 0.5) / (df + 0.5)).
    """
    import bm25s

    corpus = [bm25_tokens(d) for d in documents]
    vocab = {t: i for i, t in enumerate(sorted({t for doc in corpus for t in doc} | {t for q in queries for t in bm25_tokens(q)}))}
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(bm25s.tokenization.Tokenized(ids=[[vocab[t] for t in doc] for doc in corpus], vocab=vocab),
                    show_progress=False)
    out = np.zeros((len(queries), len(documents)), dtype=np.float64)
    for row, query in enumerate(queries):
        tokens = [t for t in bm25_tokens(query) if t in vocab]
        if tokens:
            out[row] = retriever.get_scores(tokens)
    return out


def thesis_bm25_scores(queries: list[str], documents: list[str], k1: float = 1.5, b: float = 0.75,
                       epsilon: float = 0.25) -> np.ndarray:
    """The thesis's BM25 (queries x documents): ``rank_bm25``'s Okapi (negative idf floored at epsilon
    times the mean idf) on words split at single spaces, case and punctuation kept."""
    from rank_bm25 import BM25Okapi

    if not documents:
        return np.zeros((len(queries), 0))
    index = BM25Okapi([d.split(" ") for d in documents], k1=k1, b=b, epsilon=epsilon)
    return np.array([index.get_scores(q.split(" ")) for q in queries], dtype=np.float64).reshape(len(queries), -1)


def thesis_candidates(bm25: np.ndarray, truth: np.ndarray, k: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """The thesis's candidates: each query's first k of numpy's default argsort of its negated scores
    (equal scores in the order that sort leaves them), the truth replacing the last when missing."""
    index = np.stack([np.argsort(-row)[:k] for row in bm25]) if len(bm25) else np.zeros((0, k), dtype=np.int64)
    return _truth_forced_in(index, truth)


def bm25_candidates(bm25: np.ndarray, truth: np.ndarray, k: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k candidates (BM25's best first, the truth forced in for the worst) and the truth's position."""
    index, _ = top_k(bm25, k)
    return _truth_forced_in(index.copy(), truth)


def _truth_forced_in(index: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates with each query's truth replacing its last one where missing (in place), and the truth's position."""
    position = np.empty(len(truth), dtype=np.int64)
    for row, t in enumerate(truth):
        hit = np.flatnonzero(index[row] == t)
        if hit.size:
            position[row] = hit[0]
        else:
            index[row, -1] = t
            position[row] = index.shape[1] - 1
    return index, position


def cosine_from_parts(dots: np.ndarray, query_sq: np.ndarray, doc_sq: np.ndarray) -> np.ndarray:
    """Cosines from dot products and squared norms (summed over any set of tensors); 0 where a norm is 0."""
    denom = np.sqrt(np.outer(query_sq, doc_sq))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return out


__all__ = ["RECALL_AT", "CANDIDATES", "true_ranks", "rank_metrics", "top_k", "candidate_correct", "bm25_tokens",
           "bm25_scores", "bm25_candidates", "cosine_from_parts"]
