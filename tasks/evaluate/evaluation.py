"""Select vs project: which vectors find a sample's original from its paraphrased or generated version.

For one model, checkpoint, dataset and paradigm, each query variant's vectors are
compared with the ``original`` variant's: every stored tensor alone, layer groups
(each block's attention and MLP, all attention, all MLP, the embeddings), the full
gradient, and every projection group present for both variants; by cosine and by plain
dot product.  BM25 and a sentence-embedding model on the user turn are the text
baselines.  Metrics are in tasks/evaluate/metrics.py; similarities come block by block from the
lake (tasks/evaluate/similarity.py), so only per-query ranks and the scores at the 5 BM25
candidates are kept, never a full similarity matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import zarr
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from gradlake.lake import layout
from gradlake.lake.extractions import extraction_pair
from gradlake.lake.gradient_plan import ATTR
from gradlake.lake.integrity import read_checked
from gradlake.lake.store import LakeError, LakeStore, public_url
from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.evaluate.groups import layer_groups, tensor_part
from gradlake.tasks.evaluate.metrics import (bm25_candidates, bm25_scores, candidate_correct, cosine_from_parts, rank_metrics,
                                             thesis_bm25_scores, thesis_candidates, true_ranks)
from gradlake.tasks.evaluate.similarity import blocks
from gradlake.tasks.evaluate.spec import SIMILARITIES, EvaluationSpec, check_queries, evaluation_subdir
from gradlake.tasks.evaluate.text import dense_scores, first_messages, user_turns


@dataclass
class _Scores:
    """What is kept of one vector set's similarities: ranks and the scores at the BM25 candidates."""

    ties: str = "strict"  # how a tie among the candidates counts (metrics.candidate_correct)
    ranks: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SIMILARITIES})
    correct: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SIMILARITIES})
    self_cosine: list[np.ndarray] = field(default_factory=list)

    def add(self, dots: np.ndarray, q_sq: np.ndarray, d_sq: np.ndarray, truth: np.ndarray,
            cand: np.ndarray, cand_pos: np.ndarray) -> None:
        cosine = cosine_from_parts(dots, q_sq, d_sq)
        rows = np.arange(len(truth))
        for sim, scores in (("cosine", cosine), ("dot", dots)):
            self.ranks[sim].append(true_ranks(scores, truth))
            self.correct[sim].append(candidate_correct(np.take_along_axis(scores, cand, axis=1), cand_pos, self.ties))
        self.self_cosine.append(cosine[rows, truth])


def _open(store: LakeStore, path: str) -> zarr.Group:
    try:
        return zarr.open_group(store.zarr_store, path=path, mode="r", zarr_format=3)
    except FileNotFoundError:
        raise LakeError(f"no group at {path!r} in {store.url}") from None


def _some(names: list[str], shown: int = 3) -> str:
    """A few names of a list, and how many there are in all when not all are shown."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def tensor_mismatch(query_label: str, original: dict, query: dict, query_at: str | None = None) -> str | None:
    """Why a query group's tensors cannot be compared with the originals' (one line), or None when they can.

    `original` and `query` are the groups' gradlake metadata (plan and lineage).  Both must hold the
    same tensors of the same shapes; the line names the tensors that differ and the extraction that
    would give a query group the originals' tensors.  Other layers name a group of their own, which goes
    beside the query group (at `query_at`, its URL); other shapes (max_length) do not, so the line then
    says to remove the query group first."""
    ours, theirs = original["plan"]["parameters"], query["plan"]["parameters"]
    if ours == theirs:
        return None
    at = f" at {query_at}" if query_at else ""
    only_original, only_query = [n for n in ours if n not in theirs], [n for n in theirs if n not in ours]
    redo = (f"extract {query_label} again (a group of its own, beside the {query_label} group{at})"
            if only_original or only_query else f"remove the {query_label} group{at} and extract {query_label} again")
    if only_original or only_query:
        patterns = original["lineage"].get("layer_patterns")
        layers = (" ".join(f"--layers {p!r}" for p in patterns) if patterns
                  else "no --layers: every parameter" if patterns is not None else f"its {len(ours)} tensors")
        held = "; ".join(f"only {side} has {_some(names)}" for side, names in
                         ((f"the {query_label} group", only_query), ("the original group", only_original)) if names)
        return (f"the {query_label} gradients hold other tensors than the originals' ({held}); {redo} "
                f"with the originals' layers ({layers}), or evaluate a query variant extracted with them")
    shaped = _some([f"{n}: {ours[n]} vs {theirs[n]}" for n in ours if ours[n] != theirs[n]], 2)
    return (f"the original and {query_label} gradients hold tensors of other shapes ({shaped}); {redo} "
            f"with the originals' max_length ({original['lineage'].get('max_length')})")


def _meta(group: zarr.Group) -> dict:
    return dict(group.attrs).get(ATTR) or {}


class Evaluation:
    """One query variant against the originals: reads the lake, keeps ranks, returns tables."""

    def __init__(self, spec: EvaluationSpec, query_variant: str, store: LakeStore | None = None):
        from gradlake.lake.datasets import read_dataset

        self.spec, self.store = spec, store or LakeStore(spec.lake)
        model_key, checkpoint_key = lake_keys(spec.model)
        self.variant = layout.generated_variant(model_key, checkpoint_key) if query_variant == "model_generated" else query_variant
        self.query_label = query_variant
        self.original_dir = layout.gradients_dir(model_key, checkpoint_key, spec.dataset, "original")
        self.query_dir = layout.gradients_dir(model_key, checkpoint_key, spec.dataset, self.variant)
        self.stem = layout.stem(spec.paradigm, spec.target)
        self.original_path, self.query_path = extraction_pair(
            self.store, self.original_dir, self.query_dir, self.stem, ("original", query_variant), spec.extraction,
            spec.layers, how="--extraction NAME (EvaluationSpec.extraction: a name above) or --layers PATTERN "
                             "(EvaluationSpec.layers)")
        self.originals = _open(self.store, self.original_path)
        self.query = _open(self.store, self.query_path)
        for group, path in ((self.originals, self.original_path), (self.query, self.query_path)):
            if not _meta(group).get("complete"):
                raise LakeError(f"gradient group {path} is not complete; finish its extraction first")
        rendering = [{k: _meta(g)["lineage"].get(k) for k in ("chat_template", "labels")} for g in (self.originals, self.query)]
        if rendering[0] != rendering[1]:
            said = [f"chat_template {(r['chat_template'] or {}).get('name', 'tokenizer')} "
                    f"(sha256 {(r['chat_template'] or {}).get('sha256', '-')[:12]}), labels {r['labels'] or 'assistant'}"
                    for r in rendering]
            raise LakeError(f"the original and {query_variant} gradients were rendered differently ({said[0]} vs "
                            f"{said[1]}); extract both with the same chat_template and labels")
        mismatch = tensor_mismatch(query_variant, _meta(self.originals), _meta(self.query),
                                   public_url(f"{self.store.url}/{self.query.path}"))
        if mismatch:
            raise LakeError(mismatch)
        doc_ids = [str(s) for s in read_checked(self.originals["sample"], slice(None))]  # a damaged chunk: one line
        query_ids = [str(s) for s in read_checked(self.query["sample"], slice(None))]
        position = {s: i for i, s in enumerate(doc_ids)}
        missing = [s for s in query_ids if s not in position]
        if missing:
            raise LakeError(f"{len(missing)} {query_variant} samples have no original (first: {missing[:5]}); "
                            "query and original variants must share sample ids")
        self.doc_ids, self.query_ids = doc_ids, query_ids
        self.truth = np.array([position[s] for s in query_ids])
        frame_docs = read_dataset(self.store, spec.dataset, "original", _meta(self.originals)["lineage"]["dataset_version"])
        frame_queries = read_dataset(self.store, spec.dataset, self.variant, _meta(self.query)["lineage"]["dataset_version"])
        text_docs, text_queries = user_turns(frame_docs), user_turns(frame_queries)
        self.doc_text = [text_docs[s] for s in doc_ids]
        self.query_text = [text_queries[s] for s in query_ids]
        self.ties = "first" if spec.bm25 == "thesis" else "strict"
        if spec.bm25 == "thesis":
            first_docs, first_queries = first_messages(frame_docs), first_messages(frame_queries)
            self.bm25_text = ([first_queries[s] for s in query_ids], [first_docs[s] for s in doc_ids])
        else:
            self.bm25_text = (self.query_text, self.doc_text)
        self.tensors = list(_meta(self.originals)["plan"]["parameters"])

    # BM25 and its candidates are scored when first needed, so that opening an Evaluation
    # (the CLI does, to check every group before Prefect starts) stays cheap.
    @cached_property
    def bm25(self) -> np.ndarray:
        return (thesis_bm25_scores if self.spec.bm25 == "thesis" else bm25_scores)(*self.bm25_text)

    @cached_property
    def _bm25_candidates(self) -> tuple[np.ndarray, np.ndarray]:
        return (thesis_candidates if self.spec.bm25 == "thesis" else bm25_candidates)(self.bm25, self.truth)

    @property
    def candidates(self) -> np.ndarray:
        """Each query's 5 BM25 candidates, the truth forced in."""
        return self._bm25_candidates[0]

    @property
    def candidate_pos(self) -> np.ndarray:
        """Where the truth sits among each query's candidates."""
        return self._bm25_candidates[1]

    # -- the gradient vectors ------------------------------------------------------------

    def _run(self, queries: zarr.Group, docs: zarr.Group, arrays: list[str], groups: dict[str, list[str]],
             per_array: bool, keep_candidates: bool) -> tuple[dict[str, _Scores], dict]:
        scored: dict[str, _Scores] = {}
        parts: dict[str, list] = {}  # group -> [dots, q_sq, d_sq] of the current query block
        candidates: dict[str, dict[str, list]] = {}
        membership: dict[str, list[str]] = {}
        for g, members in groups.items():
            for m in members:
                membership.setdefault(m, []).append(g)
        current = None
        for q0, q1, name, dots, q_sq, d_sq in blocks(queries, docs, arrays, len(groups), self.spec.memory_budget):
            if current != (q0, q1):
                self._flush(scored, parts, current)
                current, parts = (q0, q1), {}
            truth, cand, pos = self.truth[q0:q1], self.candidates[q0:q1], self.candidate_pos[q0:q1]
            if per_array:
                scored.setdefault(name, _Scores(self.ties)).add(dots, q_sq, d_sq, truth, cand, pos)
            if keep_candidates:
                kept = candidates.setdefault(name, {"dots": [], "q_sq": [], "d_sq": []})
                kept["dots"].append(np.take_along_axis(dots, cand, axis=1))
                kept["q_sq"].append(q_sq)
                kept["d_sq"].append(d_sq[cand])
            for g in membership.get(name, []):
                if g in parts:
                    for total, part in zip(parts[g], (dots, q_sq, d_sq)):
                        total += part
                else:
                    parts[g] = [dots.copy(), q_sq.copy(), d_sq.copy()]
        self._flush(scored, parts, current)
        return scored, {n: {k: np.concatenate(v) for k, v in c.items()} for n, c in candidates.items()}

    def _flush(self, scored: dict[str, _Scores], parts: dict, current) -> None:
        if current is None:
            return
        q0, q1 = current
        for g, (dots, q_sq, d_sq) in parts.items():
            scored.setdefault(g, _Scores(self.ties)).add(dots, q_sq, d_sq, self.truth[q0:q1], self.candidates[q0:q1],
                                                 self.candidate_pos[q0:q1])

    def gradient_scores(self) -> tuple[dict[str, _Scores], dict]:
        """Every stored tensor, the layer groups and the full gradient."""
        if not self.tensors:
            return {}, {}
        return self._run(self.query, self.originals, self.tensors, layer_groups(self.tensors), per_array=True,
                         keep_candidates=True)

    def projection_pairs(self) -> list[tuple[str, dict, zarr.Group, zarr.Group]]:
        """(label, projection settings, query group, original group) for projections present for both variants."""
        pairs = []
        docs_prefix = layout.projection_group_path(self.original_path, "")
        query_prefix = layout.projection_group_path(self.query_path, "")
        for meta_path in self.store.glob(f"{docs_prefix}*/zarr.json"):
            label = meta_path.rsplit("/", 2)[-2].removeprefix(docs_prefix.rsplit("/", 1)[-1])
            docs = _open(self.store, f"{docs_prefix}{label}")
            try:
                queries = zarr.open_group(self.store.zarr_store, path=f"{query_prefix}{label}", mode="r", zarr_format=3)
            except FileNotFoundError:
                continue
            if not (_meta(docs).get("complete") and _meta(queries).get("complete")):
                continue
            projection = _meta(docs)["lineage"]["projection"]
            if projection != _meta(queries)["lineage"]["projection"] | {"source_group": projection["source_group"]}:
                continue
            pairs.append((label, projection, queries, docs))
        return pairs

    # -- tables ----------------------------------------------------------------------------

    def results(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """(metrics per vector set and similarity, self-similarity per sample, greedy layer selection)."""
        rows, selfsim = [], []
        plan = _meta(self.originals)["plan"]["parameters"]
        sizes = {n: int(np.prod(s)) for n, s in plan.items()}
        groups = layer_groups(self.tensors) if self.tensors else {}
        scored, candidates = self.gradient_scores()
        for name, s in scored.items():
            if name in sizes:
                block, part = tensor_part(name)
                kind, n_values = "tensor", sizes[name]
            else:
                block = int(name[5:].split(".")[0]) if name.startswith("block") else None
                part = name.split(".")[-1] if name.startswith("block") else name
                kind, n_values = ("full" if name == "full" else "group"), sum(sizes[m] for m in groups[name])
            rows += self._rows(name, kind, part, block, n_values, s)
            selfsim.append(pd.DataFrame({"vectors": name, "kind": kind, "sample": self.query_ids,
                                         "self_cosine": np.concatenate(s.self_cosine)}))
        for label, projection, queries, docs in self.projection_pairs():
            arrays = list(projection["dims"])
            got, _ = self._run(queries, docs, arrays, {label: arrays}, per_array=False, keep_candidates=False)
            rows += self._rows(f"proj:{label}", "projection", projection["kind"], None, int(projection["dim"]), got[label],
                               projection=projection)
            selfsim.append(pd.DataFrame({"vectors": f"proj:{label}", "kind": "projection", "sample": self.query_ids,
                                         "self_cosine": np.concatenate(got[label].self_cosine)}))
        rows += self._text_rows()
        greedy = greedy_selection(candidates, self.candidate_pos, self.spec.greedy_steps, sizes, self.ties)
        table = pd.DataFrame(rows)
        table.insert(0, "query", self.query_label)
        selfsim_frame = pd.concat(selfsim, ignore_index=True) if selfsim else pd.DataFrame()
        if not selfsim_frame.empty:
            selfsim_frame.insert(0, "query", self.query_label)
        greedy.insert(0, "query", self.query_label)
        return table, selfsim_frame, greedy

    def _rows(self, name, kind, part, block, n_values, s: _Scores, projection: dict | None = None) -> list[dict]:
        out = []
        for sim in SIMILARITIES:
            ranks = np.concatenate(s.ranks[sim])
            out.append({"vectors": name, "kind": kind, "part": part, "block": block, "n_values": n_values,
                        "similarity": sim, **rank_metrics(ranks),
                        "bm25_top5_accuracy": float(np.concatenate(s.correct[sim]).mean()),
                        "self_cosine_mean": float(np.concatenate(s.self_cosine).mean()),
                        "projection_kind": (projection or {}).get("kind"), "projection_scope": (projection or {}).get("scope"),
                        "projection_seed": (projection or {}).get("seed")})
        return out

    def _text_rows(self) -> list[dict]:
        baselines = {"bm25": self.bm25}
        if self.spec.dense_baseline:
            baselines["dense:all-MiniLM-L6-v2"] = dense_scores(self.query_text, self.doc_text)
        out = []
        rows = np.arange(len(self.truth))
        for name, scores in baselines.items():
            ranks = true_ranks(scores, self.truth)
            correct = candidate_correct(np.take_along_axis(scores, self.candidates, axis=1), self.candidate_pos, self.ties)
            out.append({"vectors": name, "kind": "text", "part": name.split(":")[0], "block": None, "n_values": None,
                        "similarity": "bm25" if name == "bm25" else "cosine", **rank_metrics(ranks),
                        "bm25_top5_accuracy": float(correct.mean()), "self_cosine_mean": float(scores[rows, self.truth].mean())
                        if name != "bm25" else None})
        return out


def greedy_selection(candidates: dict, truth_position: np.ndarray, steps: int, sizes: dict[str, int],
                     ties: str = "strict") -> pd.DataFrame:
    """Add, step by step, the tensor that most raises cosine accuracy on the BM25 candidates (thesis protocol).

    ``candidates[name]`` holds that tensor's dot products with each query's candidates
    (``dots``, queries x 5), the queries' squared norms (``q_sq``) and the candidates'
    (``d_sq``, queries x 5); a set of tensors' cosine is their sums' ratio.  Ties go to the
    tensor met first (model order).  Selection stops at the first step whose best tensor
    does not raise the accuracy (a larger set that scores no better is no finding), after
    ``steps`` steps, or when every tensor is in; the last row's ``stop_reason`` says which.
    """
    columns = ["step", "added", "accuracy", "n_values", "stop_reason"]
    if not candidates or steps == 0:
        return pd.DataFrame(columns=columns)
    chosen: list[str] = []
    rows: list[dict] = []
    total_dots = total_q = total_d = None
    reason = f"every tensor selected ({len(candidates)})"
    while len(chosen) < len(candidates):
        if len(chosen) == steps:
            reason = f"greedy_steps reached ({steps})"
            break
        best = None
        for name, c in candidates.items():
            if name in chosen:
                continue
            dots = c["dots"] if total_dots is None else total_dots + c["dots"]
            q_sq = c["q_sq"] if total_q is None else total_q + c["q_sq"]
            d_sq = c["d_sq"] if total_d is None else total_d + c["d_sq"]
            cosine = dots / np.maximum(np.sqrt(q_sq[:, None] * d_sq), np.finfo(np.float64).tiny)
            accuracy = float(candidate_correct(cosine, truth_position, ties).mean())
            if best is None or accuracy > best[1]:
                best = (name, accuracy, dots, q_sq, d_sq)
        name, accuracy = best[:2]
        if rows and accuracy <= rows[-1]["accuracy"]:
            reason = (f"no gain: the best next tensor, {name}, gives {accuracy:.3f}, "
                      f"not above {rows[-1]['accuracy']:.3f}")
            break
        total_dots, total_q, total_d = best[2:]
        chosen.append(name)
        rows.append({"step": len(chosen), "added": name, "accuracy": accuracy,
                     "n_values": sum(sizes[n] for n in chosen), "stop_reason": None})
    rows[-1]["stop_reason"] = reason
    return pd.DataFrame(rows, columns=columns)


def plan_evaluation(spec: EvaluationSpec) -> list[Evaluation]:
    """Check every input of an evaluation before any work and any write; each query variant's opened Evaluation.

    The query variants (distinct, 'original' not among them), each variant's gradient group against
    the originals' (there, complete, rendered alike, the same tensors and shapes, sample ids shared),
    the dataset texts, and that the lake can be written.  The CLI calls it before Prefect starts, the
    flow again (a deployment's run has no CLI before it)."""
    check_queries(spec.queries)  # again: a spec changed by model_copy(update=...) is not validated
    store = LakeStore(spec.lake)
    evaluations = [Evaluation(spec, q, store) for q in spec.queries]
    chosen = {e.original_path for e in evaluations}
    if len(chosen) > 1:  # one evaluation compares one extraction: its results go to that extraction's directory
        raise LakeError(f"the query variants {spec.queries} pair with different extractions of the originals "
                        f"({sorted(p.rsplit('/', 1)[-1] for p in chosen)}); pick one with --extraction NAME")
    store.check_writable()  # after the groups: a lake that is not there is said as such, not created by the probe
    return evaluations


def run_evaluation(spec: EvaluationSpec, log=print) -> tuple[str, pd.DataFrame]:
    """Evaluate every query variant, write tables, plots and reports to the lake; returns (directory, results)."""
    import datetime as dt

    from gradlake.lake.evaluations import write_evaluation
    from gradlake.tasks.evaluate.report import html_report, markdown, plots

    evaluations = plan_evaluation(spec)
    store = evaluations[0].store
    tables: dict[str, list[pd.DataFrame]] = {"results": [], "self_similarity": [], "greedy": []}
    for evaluation in evaluations:
        log(f"evaluating {evaluation.query_label} ({len(evaluation.query_ids)} queries against "
            f"{len(evaluation.doc_ids)} originals, {len(evaluation.tensors)} tensors)")
        for name, frame in zip(tables, evaluation.results()):
            tables[name].append(frame)
    merged = {name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()}
    model_key, checkpoint_key = lake_keys(spec.model)
    directory = layout.evaluation_dir(model_key, checkpoint_key, spec.dataset,
                                      evaluation_subdir(spec, evaluations[0].original_path))
    original_meta = _meta(evaluations[0].originals)["lineage"]
    lineage = {
        "model": original_meta["model"], "checkpoint": original_meta["checkpoint"],
        "resolved_commit": original_meta.get("resolved_commit"), "dataset": spec.dataset, "paradigm": spec.paradigm,
        "queries": {e.query_label: e.variant for e in evaluations},
        "gradient_groups": {e.query_label: e.query_path for e in evaluations} | {"original": evaluations[0].original_path},
        "extraction": evaluations[0].original_path.rsplit("/", 1)[-1],
        "layer_patterns": original_meta.get("layer_patterns"),
        "projections": sorted({r for r in merged["results"]["vectors"] if r.startswith("proj:")}),
        "settings": spec.model_dump(exclude={"lake", "model"}),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    figures = plots(merged["results"], merged["self_similarity"], merged["greedy"])
    protocol = ("" if spec.target == "parameters" else f", gradients w.r.t. {spec.target}") + \
        ("" if spec.bm25 == "lucene" else ", thesis BM25 protocol")
    named = lineage["extraction"] if not lineage["extraction"].endswith("-store") else None
    title = f"Select vs project: {model_key} @ {checkpoint_key}, {spec.dataset} ({spec.paradigm}{protocol}" + \
        (f", extraction {named})" if named else ")")
    reports = {"report.md": markdown(title, lineage, merged["results"], merged["greedy"], sorted(figures)),
               "report.html": html_report(title, lineage, merged["results"], merged["greedy"], figures)}
    write_evaluation(store, directory, merged, figures, reports, lineage)
    log(f"evaluation written to {spec.lake}/{directory} ({len(figures)} plots)")
    return directory, merged["results"]


@task(name="evaluate", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_bad_input)
def evaluate_task(spec: EvaluationSpec) -> str:
    """`run_evaluation` as a Prefect task; returns the results' directory."""
    directory, _ = run_evaluation(spec, log=get_run_logger().info)
    return directory
