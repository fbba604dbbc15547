"""The attribution benchmark's baselines, scored from what the lake already holds for the attributed model.

Every baseline scores the benchmark's queries against the training samples of the
attributed run only (never the dataset's other samples: BM25's word statistics and TRAK's
Gram matrix depend on the set scored against):

- ``grad-dot`` and ``grad-cosine``: the full stored gradient (every tensor of the
  ``store`` group), query against training sample, accumulated block by block;
- ``grad-cosine:<tensor>`` for every stored tensor (kind ``tensor``): the candidates of the
  benchmark's cross-fitted ``grad-cosine:best-tensor`` row, never rows of their own;
- ``proj-cosine:<setting>`` and ``trak:<setting>`` for each projection group;
- ``bm25`` and ``dense``: the text baselines on the user turns.

TRAK (Park et al., 2023) here: the features are the projected gradients of gradlake's
sample loss (its output function: the mean token cross-entropy over the label positions)
and TRAK's diagonal reweighting Q is the identity, so one model's score is
``phi_q (Phi^T Phi + lambda I)^-1 phi_i`` with ``Phi`` the training samples' features
(traker's own score computer, which divides the inverse by its mean absolute value to keep
half precision safe), ``lambda`` being ``trak_lambda`` times the mean diagonal of ``Phi^T Phi``.  TRAK ensembles over models; here over the attributed run's saved
checkpoints that hold the projection (TRAK's own cheaper alternative to independent
retrainings): the score is the mean of the checkpoints' scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from gradlake.lake import layout
from gradlake.lake.datasets import read_dataset
from gradlake.lake.extractions import AmbiguousExtraction, extraction_pair
from gradlake.lake.gradient_plan import NOT_GRADIENTS
from gradlake.lake.integrity import read_checked
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.attribution.queries import QuerySet, resolve_queries
from gradlake.tasks.attribution.spec import AttributionSpec, method_path
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.training.spec import checkpoint_name


class BaselineError(ValueError):
    """Gradients or data that cannot give a baseline, with what would make them."""


@dataclass
class GradientPair:
    """Stored gradients of the queries and of the training samples at one checkpoint, with row positions."""

    query_dir: str
    train_dir: str
    query_group: zarr.Group
    train_group: zarr.Group
    query_rows: np.ndarray
    train_rows: np.ndarray
    tensors: list[str]


def _open_group(store: LakeStore, path: str) -> zarr.Group:
    try:
        group = zarr.open_group(store.zarr_store, path=path, mode="r", zarr_format=3)
    except FileNotFoundError:
        raise LakeError(f"no group at {store.url}/{path}") from None
    if not dict(group.attrs).get("gradlake", {}).get("complete"):
        raise LakeError(f"gradient group {path} is not complete; finish its extraction first")
    return group


def _rows(group: zarr.Group, ids: list[str], what: str, path: str) -> np.ndarray:
    position = {str(s): i for i, s in enumerate(read_checked(group["sample"], slice(None)))}
    missing = [i for i in ids if i not in position]
    if missing:
        raise LakeError(f"{len(missing)} {what} have no gradients in {path} (first: {missing[:3]}); extract them first")
    return np.array([position[i] for i in ids])


def gradient_pair(store: LakeStore, model: ModelSpec, train_dataset: str, train_variant: str, queries: QuerySet,
                  train_ids: list[str], paradigm: str, extraction: str | None = None) -> GradientPair:
    """The query and training gradient groups of `model` (one group when held-out queries share the training
    variant), checked to be complete and tokenized alike; one LakeError otherwise.

    Of several extractions of a variant, the one held for both with the same settings, or the one `extraction`
    names (`lake.extractions`); several without a choice are one `AmbiguousExtraction`."""
    from gradlake.tasks.common.lineage import lake_keys

    model_key, checkpoint_key = lake_keys(model)
    train_dir, query_dir = extraction_pair(store, layout.gradients_dir(model_key, checkpoint_key, train_dataset, train_variant),
                                           layout.gradients_dir(model_key, checkpoint_key, queries.dataset, queries.variant),
                                           layout.stem(paradigm), (train_variant, queries.variant), extraction,
                                           how="AttributionSpec.extraction (--extraction NAME, a name above)")
    train_group = _open_group(store, train_dir)
    query_group = train_group if query_dir == train_dir else _open_group(store, query_dir)
    metas = [dict(g.attrs)["gradlake"] for g in (query_group, train_group)]
    tokenizers = {m["lineage"].get("tokenizer_hash") for m in metas}
    if len(tokenizers) != 1:
        raise BaselineError(f"the queries ({queries.variant}) and the training set ({train_variant}) were tokenized "
                            f"with different tokenizers ({sorted(map(str, tokenizers))}); extract both with one model")
    rendering = [{k: m["lineage"].get(k) for k in ("chat_template", "labels")} for m in metas]
    if rendering[0] != rendering[1]:
        raise BaselineError(f"the query and training gradients were rendered differently ({rendering[0]} vs "
                            f"{rendering[1]}); extract both with the same chat_template and labels")
    tensors = list(metas[1]["plan"]["parameters"])
    if sorted(metas[0]["plan"]["parameters"]) != sorted(tensors):
        raise BaselineError(f"the query gradients ({query_dir}) hold other tensors than the training gradients "
                            f"({train_dir}); extract both with the same layers")
    return GradientPair(query_dir, train_dir, query_group, train_group,
                        _rows(query_group, queries.ids, "queries", query_dir),
                        _rows(train_group, train_ids, "training samples", train_dir), tensors)


def projection_pairs(store: LakeStore, pair: GradientPair, paradigm: str) -> list[tuple[str, dict, zarr.Group, zarr.Group]]:
    """(label, projection settings, query group, training group) for projections complete on both sides."""
    found = []
    train_prefix, query_prefix = (layout.projection_group_path(p, "") for p in (pair.train_dir, pair.query_dir))
    for meta_path in store.glob(f"{train_prefix}*/zarr.json"):
        label = meta_path.rsplit("/", 2)[-2].removeprefix(train_prefix.rsplit("/", 1)[-1])
        try:
            train = _open_group(store, f"{train_prefix}{label}")
            query = train if query_prefix == train_prefix else _open_group(store, f"{query_prefix}{label}")
        except LakeError:
            continue
        projection = dict(train.attrs)["gradlake"]["lineage"]["projection"]
        query_projection = dict(query.attrs)["gradlake"]["lineage"]["projection"]
        if projection != query_projection | {"source_group": projection["source_group"]}:
            continue
        found.append((label, projection, query, train))
    return sorted(found, key=lambda item: item[0])


def _dots(queries: zarr.Group, docs: zarr.Group, arrays: list[str], query_rows: np.ndarray, train_rows: np.ndarray,
          per_array: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Dot products and squared norms summed over `arrays`, for the rows asked (and per array when asked)."""
    from gradlake.tasks.evaluate.similarity import blocks

    n_query, n_docs = queries[arrays[0]].shape[0], docs[arrays[0]].shape[0]
    dots, q_sq, d_sq = np.zeros((n_query, n_docs)), np.zeros(n_query), np.zeros(n_docs)
    parts: dict[str, list] = {}
    seen = set()
    for q0, q1, name, block, qs, ds in blocks(queries, docs, arrays, 1 + per_array, 1 << 30):
        dots[q0:q1] += block
        q_sq[q0:q1] += qs
        if name not in seen:
            d_sq += ds
            seen.add(name)
        if per_array:
            part = parts.setdefault(name, [np.zeros((n_query, n_docs)), np.zeros(n_query), ds])
            part[0][q0:q1] = block
            part[1][q0:q1] = qs
    cut = np.ix_(query_rows, train_rows)
    sliced = {n: (p[0][cut], p[1][query_rows], p[2][train_rows]) for n, p in parts.items()}
    return dots[cut], q_sq[query_rows], d_sq[train_rows], sliced


def _features(group: zarr.Group, rows: np.ndarray) -> np.ndarray:
    arrays = sorted(set(group.array_keys()) - set(NOT_GRADIENTS))
    return np.concatenate([read_checked(group[a], slice(None), np.float32)[rows] for a in arrays], axis=1)


def trak_scores(query_features: np.ndarray, train_features: np.ndarray, ratio: float) -> np.ndarray:
    """One model's TRAK scores (queries, train) with traker's score computer; `train_features` are the training
    samples' only (they make the Gram matrix)."""
    from trak.score_computers import BasicScoreComputer

    train = torch.as_tensor(train_features, dtype=torch.float32)
    query = torch.as_tensor(query_features, dtype=torch.float32)
    xtx = train.T @ train
    computer = BasicScoreComputer(dtype=torch.float32, device=torch.device("cpu"),
                                  lambda_reg=float(ratio * xtx.diagonal().mean()))
    features = computer.get_x_xtx_inv(train, computer.get_xtx(train))
    scores = torch.zeros(train.shape[0], query.shape[0])
    computer.get_scores(features, query, scores)
    return scores.T.numpy()


def text_of(store: LakeStore, dataset: str, variant: str, ids: list[str]) -> list[str]:
    """The user turns of these samples, in order."""
    from gradlake.tasks.evaluate.text import user_turns

    turns = user_turns(read_dataset(store, dataset, variant))
    return [turns[i] for i in ids]


@dataclass
class BaselineContext:
    """What the baselines of one benchmark need: where to write, the queries and training samples, the checkpoints."""

    store: LakeStore
    model: ModelSpec                          # the attributed checkpoint
    ensemble: list[ModelSpec]                 # checkpoints of the run for TRAK's ensemble (the attributed one included)
    train_dataset: str
    train_variant: str
    train_ids: list[str]
    paradigm: str
    trak_lambda: float
    path_of: Callable[[str], str]             # method name -> score group path
    extraction: str | None = None             # which extraction's gradient groups (lake.extractions), where several


def baseline_scores(ctx: BaselineContext, queries: QuerySet, log: Callable[[str], None] = print) -> list[str]:
    """Score groups of every baseline the lake's groups allow, for these queries against the training samples;
    returns their method names (per-tensor candidates included).  Scores found complete with the same samples and
    settings are kept."""
    store = ctx.store
    train_keys = [f"{ctx.train_variant}:{i}" for i in ctx.train_ids]
    lineage = {"model": ctx.model.model, "checkpoint": ctx.model.checkpoint, "queries": f"{queries.dataset}.{queries.variant}"}
    written, reused = [], []

    def held(method: str, settings: dict | None = None) -> bool:
        """Complete scores of these settings and training samples for every query asked (a group of more queries
        serves too: the benchmark reads the rows it needs), so that benchmarks of other query subsets share them."""
        group = ScoreGroup.open(store, ctx.path_of(method), missing_ok=True)
        if (group is None or not group.meta.get("complete") or group.meta.get("settings") != (settings or {})
                or not set(queries.ids) <= set(group.query_ids()) or group.train_ids() != train_keys):
            return False
        written.append(method)
        reused.append(method)
        return True

    def write(method: str, kind: str, scores: np.ndarray, seconds: float, settings: dict | None = None) -> None:
        path = ctx.path_of(method)
        meta = {"method": method, "kind": kind, "settings": settings or {}, "lineage": lineage,
                "compute_seconds": round(seconds, 3)}
        existing = ScoreGroup.open(store, path, missing_ok=True)
        if existing is not None:  # other samples or settings: cheap, derived, made again
            store.fs.rm(store.path(path), recursive=True)
        group = ScoreGroup.create(store, path, queries.ids, train_keys, meta, query_rows=max(1, len(queries.ids)))
        group.write_rows(0, scores.astype(np.float32))
        group.finish(lake_bytes=int(scores.size * 4), compute_seconds=meta["compute_seconds"])
        written.append(method)

    try:
        pair = gradient_pair(store, ctx.model, ctx.train_dataset, ctx.train_variant, queries, ctx.train_ids, ctx.paradigm,
                             ctx.extraction)
    except AmbiguousExtraction:  # gradients there are, of several extractions: which one is the user's to say
        raise
    except LakeError as err:
        log(f"no gradients of {ctx.model.model}@{ctx.model.checkpoint} for the queries ({err}); scoring the text "
            f"baselines only (extract '{ctx.train_variant}' and the queries' variant for the gradient baselines)")
        pair = None
    # Scores of a named extraction say which (scores of the plain '<stem>-store' group keep the settings they had).
    named = {} if pair is None or pair.train_dir.endswith("-store") else {"extraction": pair.train_dir.rsplit("/", 1)[-1]}
    if pair is not None and pair.tensors:
        per_tensor = [f"grad-cosine:{t}" for t in pair.tensors] if len(pair.tensors) > 1 else []
        if not all(held(m, named) for m in ["grad-dot", "grad-cosine", *per_tensor]):
            from gradlake.tasks.evaluate.metrics import cosine_from_parts

            started = time.perf_counter()
            dots, q_sq, d_sq, parts = _dots(pair.query_group, pair.train_group, pair.tensors, pair.query_rows,
                                            pair.train_rows, per_array=len(pair.tensors) > 1)
            seconds = time.perf_counter() - started
            write("grad-dot", "gradient", dots, seconds, named)
            write("grad-cosine", "gradient", cosine_from_parts(dots, q_sq, d_sq), seconds, named)
            for tensor in pair.tensors if len(pair.tensors) > 1 else []:
                write(f"grad-cosine:{tensor}", "tensor", cosine_from_parts(*parts[tensor]), seconds / len(pair.tensors),
                      named)
    for label, projection, query_group, train_group in (projection_pairs(store, pair, ctx.paradigm) if pair else []):
        arrays = sorted(set(query_group.array_keys()) - set(NOT_GRADIENTS))
        if not held(f"proj-cosine:{label}", {"projection": projection}):
            from gradlake.tasks.evaluate.metrics import cosine_from_parts

            started = time.perf_counter()
            dots, q_sq, d_sq, _ = _dots(query_group, train_group, arrays, pair.query_rows, pair.train_rows)
            write(f"proj-cosine:{label}", "projection", cosine_from_parts(dots, q_sq, d_sq),
                  time.perf_counter() - started, {"projection": projection})
        trak_ensemble(ctx, queries, label, projection, held, write, log)
    text_methods = [m for m in ("bm25", "dense") if not held(m)]
    if text_methods:  # both read the same user turns: read once
        from gradlake.tasks.evaluate.text import dense_scores
        from gradlake.tasks.evaluate.metrics import bm25_scores

        query_text = text_of(store, queries.dataset, queries.variant, queries.ids)
        train_text = text_of(store, ctx.train_dataset, ctx.train_variant, ctx.train_ids)
        for method in text_methods:
            started = time.perf_counter()
            scores = (bm25_scores if method == "bm25" else dense_scores)(query_text, train_text)
            write(method, "text", scores, time.perf_counter() - started)
    def short(methods: list[str]) -> list[str]:
        tensors = [m for m in methods if m.startswith("grad-cosine:")]
        return [m for m in methods if m not in tensors] + ([f"grad-cosine:<each of {len(tensors)} tensors>"] if tensors else [])

    log(f"baselines for queries {queries.label!r} in the lake: {short(written)} "
        f"(computed {short([m for m in written if m not in reused])}, found in the lake {short(reused)})")
    return written


def trak_ensemble(ctx: BaselineContext, queries: QuerySet, label: str, projection: dict, held, write, log) -> None:
    """TRAK on one projection setting, averaged over the run's checkpoints that hold it for both sides."""
    members, scores = [], []
    started = time.perf_counter()
    for model in ctx.ensemble:
        try:
            pair = gradient_pair(ctx.store, model, ctx.train_dataset, ctx.train_variant, queries, ctx.train_ids,
                                 ctx.paradigm, ctx.extraction)
        except LakeError:
            continue
        match = [p for p in projection_pairs(ctx.store, pair, ctx.paradigm) if p[0] == label]
        if match:
            members.append(model.checkpoint)
            scores.append((pair, match[0]))
    settings = {"projection": {k: v for k, v in projection.items() if k != "source_group"},
                "trak_lambda": ctx.trak_lambda, "ensemble": members, "output_function": "sample loss",
                "train_ids": "the run's training samples only"}
    if held(f"trak:{label}", settings):
        return
    total = None
    for pair, (_, _, query_group, train_group) in scores:
        one = trak_scores(_features(query_group, pair.query_rows), _features(train_group, pair.train_rows),
                          ctx.trak_lambda)
        total = one if total is None else total + one
    write(f"trak:{label}", "trak", total / len(scores), time.perf_counter() - started, settings)
    log(f"trak:{label}: an ensemble of {len(members)} checkpoints ({', '.join(members)})")


def baseline_context(spec: AttributionSpec, plan: dict) -> BaselineContext:
    ensemble = [ModelSpec(model=spec.train.output, checkpoint=checkpoint_name(s), dtype=spec.train.model.dtype,
                          device=spec.train.model.device) for s in plan["trak_steps"]]
    return BaselineContext(store=LakeStore(spec.train.lake), model=spec.model, ensemble=ensemble,
                           train_dataset=spec.train.dataset, train_variant=spec.train.variants[0],
                           train_ids=plan["train_ids"], paradigm=spec.train.paradigm, trak_lambda=spec.trak_lambda,
                           path_of=lambda method: method_path(spec, method), extraction=spec.extraction)


@task(name="baselines", cache_policy=NONE, retries=1, retry_delay_seconds=[30], retry_condition_fn=retry_unless_bad_input)
def baselines_task(spec: AttributionSpec, plan: dict) -> list[str]:
    """The baselines for the benchmark's queries, and for each retrieval variant whose data the lake holds."""
    log = get_run_logger()
    context = baseline_context(spec, plan)
    written = baseline_scores(context, plan["queries"], log=log.info)
    for label in spec.retrieval_queries:
        if label == spec.queries:
            continue
        try:
            queries = resolve_queries(spec, plan["train_ids"], label)
        except (LakeError, FileNotFoundError, ValueError) as err:
            log.info("no retrieval baselines for queries %r: %s", label, err)
            continue
        # retrieval is about the queries made from training samples
        keep = [k for k, s in enumerate(queries.sources) if s is not None][: spec.max_queries]
        queries = QuerySet(label, queries.dataset, queries.variant, [queries.ids[k] for k in keep],
                           [queries.chats[k] for k in keep], [queries.sources[k] for k in keep])
        if len(queries.ids) < 1:
            continue
        baseline_scores(BaselineContext(**{**context.__dict__, "path_of": lambda m, q=label: method_path(spec, m, q)}),
                        queries, log=log.info)
    return written
