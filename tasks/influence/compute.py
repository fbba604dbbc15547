"""Influence for one model, training set and query set: planned, factors fitted or reused, score blocks into the lake,
and its Prefect tasks (the method: `tasks/influence/__init__.py`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from gradlake.lake import layout
from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import DamagedMetadata, LakeError, LakeStore, public_url, read_json, read_json_attrs
from gradlake.tasks.common.loss import chat_template_text, encode_sample
from gradlake.tasks.common.model import (DTYPES, ModelSpec, capped_length, check_model, hub_options,
                                         lake_names, resolved_commit)
from gradlake.tasks.common.progress import Progress, duration
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.common.weights import check_weights
from gradlake.tasks.influence.kronfluence import (EncodedSet, collate, copy_factors_to_lake, factor_args, factors_from_lake,
                                                  kronfluence_version, linear_from_conv1d, score_args, task_class,
                                                  tracked_modules)
from gradlake.tasks.influence.spec import InfluenceError, InfluenceSpec, damping_factor, settings_key


PROGRESS_EVERY = 30.0  # seconds between two progress lines of a factor or score phase

# ---------------------------------------------------------------- which modules are tracked


# ---------------------------------------------------------------- data

def _frame(store: LakeStore, dataset: str, variant: str):
    meta = dataset_meta(store, dataset, variant)
    return meta, read_dataset(store, dataset, variant, meta["version"])


def load_sets(spec: InfluenceSpec) -> tuple[list[str], list[list[dict]], list[str], list[list[dict]], dict]:
    """(train keys, train chats, query ids, query chats, dataset versions), or one clear error."""
    store = LakeStore(spec.lake)
    keys, chats, versions = [], [], {}
    known: set[str] = set()
    wanted = set(spec.train_ids) if spec.train_ids is not None else None
    for variant in spec.train_variants:
        meta, frame = _frame(store, spec.dataset, variant)
        versions[f"{spec.dataset}/{variant}"] = meta["version"]
        known.update(frame["id"])
        for sample_id, messages in zip(frame["id"], frame["messages"]):
            if wanted is None or sample_id in wanted:
                keys.append(f"{variant}:{sample_id}")
                chats.append(messages)
    if wanted is not None and wanted - known:
        raise InfluenceError(f"train_ids {sorted(wanted - known)[:5]} are not in dataset {spec.dataset!r}")
    query_dataset = spec.query_dataset or spec.dataset
    meta, frame = _frame(store, query_dataset, spec.queries)
    versions[f"{query_dataset}/{spec.queries}"] = meta["version"]
    frame = frame.assign(id=[str(i) for i in frame["id"]])
    if spec.query_ids is not None:
        frame = _chosen_queries(frame, spec.query_ids, f"dataset {query_dataset!r} variant {spec.queries!r}")
    if spec.max_queries:
        frame = frame.head(spec.max_queries)
    return keys, chats, list(frame["id"]), list(frame["messages"]), versions


def _chosen_queries(frame, query_ids: list[str], where: str):
    """The rows of `frame` with these ids, in their order; every id must be there."""
    rows = {sample_id: row for row, sample_id in enumerate(frame["id"])}
    missing = [i for i in query_ids if i not in rows]
    if missing:
        raise InfluenceError(f"query_ids {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} of "
                             f"{len(query_ids)}) are not in {where}; its ids look like {list(frame['id'][:3])}")
    return frame.iloc[[rows[i] for i in query_ids]]


# ---------------------------------------------------------------- running


def plan_influence(spec: InfluenceSpec) -> dict:
    """Every check before any work: model config, data, tokenizer, tracked modules."""
    return _plan(spec)[0]


def _plan(spec: InfluenceSpec) -> tuple[dict, tuple]:
    """(the plan, the sets read from the lake) so that a run reads them once."""
    from transformers import AutoModelForCausalLM

    config = check_model(spec.model)
    check_weights(spec.model, config)
    chat_template_text(spec.chat_template)  # a named Jinja file must be readable before any work
    sets = load_sets(spec)
    LakeStore(spec.lake).check_links()  # factors and scores are written into the lake: no link may lead out of it
    keys, _, query_ids, _, versions = sets
    if not keys or not query_ids:
        raise InfluenceError(f"{len(keys)} training samples and {len(query_ids)} queries: nothing to score")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    converted = linear_from_conv1d(skeleton)  # as the run will, so that patterns and keywords see the same modules
    modules = tracked_modules(skeleton, spec.layers)
    return {"n_train": len(keys), "n_query": len(query_ids), "modules": modules, "converted_conv1d": converted,
            "versions": versions}, sets


def _record(spec: InfluenceSpec, spec_model: ModelSpec, commit: str, plan: dict, tracked_conv1d: list[str],
            factors_dir: str) -> tuple[dict, dict]:
    """(settings, lineage) of a score group: what determines the scores, and how they were made."""
    name, checkpoint = lake_names(spec_model)
    # What determines the scores; not where they run (a retry on another worker or device resumes the same group).
    settings = spec.model_dump(mode="json", exclude={"lake", "train_block", "train_batch_size", "query_batch_size", "model"})
    settings["model"] = {"model": name, "checkpoint": checkpoint, "dtype": spec.model.dtype}
    # Groups written before these choices existed keep equal settings: the heuristic stays None, an unset
    # query_ids is left out, converted Conv1D appear only when tracked; 'kronfluence' is stored as its number.
    damping_rule, damping_value = damping_factor(spec)
    settings["damping"] = damping_value
    if spec.query_ids is None:
        del settings["query_ids"]
    if spec.chat_template == "tokenizer":
        del settings["chat_template"]
    if tracked_conv1d:
        settings["converted_conv1d"] = tracked_conv1d
    lineage = {"model": name, "checkpoint": checkpoint, "resolved_commit": commit, "versions": plan["versions"],
               "tracked_modules": plan["modules"], "converted_conv1d": plan["converted_conv1d"],
               "damping_rule": damping_rule, "damping_factor": damping_value, "factors": factors_dir,
               "tool": "kronfluence", "tool_version": kronfluence_version()}
    return settings, lineage


def compute_influence(spec: InfluenceSpec, log: Callable[[str], None] = print, work_dir: str | None = None) -> str:
    """Fit (or reuse) the factors, score every block not yet in the lake, mark complete; returns the score group path."""
    with tempfile.TemporaryDirectory(prefix="gradlake-factors-", dir=work_dir) as fetched:
        return _compute_influence(spec, log, work_dir, Path(fetched) / "factors")


def _compute_influence(spec: InfluenceSpec, log: Callable[[str], None], work_dir: str | None, fetched: Path) -> str:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.factor.config import FactorConfig
    from kronfluence.utils.dataset import DataLoaderKwargs

    from gradlake.tasks.common.lineage import lake_keys
    from gradlake.tasks.common.model import load_tokenizer

    plan, sets = _plan(spec)
    store = LakeStore(spec.lake)
    spec_model = spec.model.resolved()
    commit = resolved_commit(spec_model)
    keys, train_chats, query_ids, query_chats, versions = sets
    converted = set(plan["converted_conv1d"])
    tracked_conv1d = [m for m in plan["modules"] if m in converted]
    key = settings_key(spec, versions, commit, tracked_conv1d)
    model_key, checkpoint_key = lake_keys(spec_model)
    factors_dir = layout.influence_factors_dir(model_key, checkpoint_key, spec.dataset, spec.paradigm, spec.strategy, key)
    path = layout.score_group_path(model_key, checkpoint_key, spec.dataset, spec.query_dataset or spec.dataset, spec.queries,
                                   spec.method_name)
    settings, lineage = _record(spec, spec_model, commit, plan, tracked_conv1d, factors_dir)
    # factors the lake holds are fetched, each file checked, before anything is written (unless the scores look done)
    reused = None if _looks_complete(store, path) else factors_from_lake(store, factors_dir, fetched, log)
    n_train = len(keys)
    group = _score_group(store, path, query_ids, keys, {"method": spec.method_name, "kind": "influence",
                                                        "settings": settings, "lineage": lineage}, spec.train_block)
    # a block: every query (their gradients are computed once per block) x `train_block` training samples
    # complete only when every flag says so (a damaged flag object: one LakeError naming it, `verify --repair` mends it)
    if group.meta.get("complete") and not group.pending_blocks():
        log(f"scores {path} are complete in the lake; nothing to do")
        return path
    tokenizer = load_tokenizer(spec_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length, capped = capped_length(spec.max_length, check_model(spec.model), spec.model.model)
    if capped:
        log(capped)
    template = chat_template_text(spec.chat_template)
    encode = lambda chats: [encode_sample(tokenizer, c, spec.paradigm, max_length, template) for c in chats]  # noqa: E731
    train_set, query_set = EncodedSet(encode(train_chats)), EncodedSet(encode(query_chats))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec_model.source()[0], dtype=DTYPES[spec_model.dtype],
                                                 trust_remote_code=spec_model.trust_remote_code, **hub_options(spec_model))
    linear_from_conv1d(model)  # the same modules as the plan's skeleton: both are built from the config
    model = model.to(spec_model.torch_device()).eval()
    task = task_class()(plan["modules"], spec.seed)
    model = prepare_model(model, task)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradlake-kronfluence-", dir=work_dir) as tmp:
        analyzer = Analyzer(analysis_name="gradlake", model=model, task=task, cpu=spec_model.torch_device().type == "cpu",
                            output_dir=tmp, disable_tqdm=True, log_level=30)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate(pad_id)))
        local_factors = analyzer.factors_output_dir(factors_name=key)
        if reused is None:  # not fetched above: the group looked complete
            reused = factors_from_lake(store, factors_dir, fetched, log)
        if reused:
            local_factors.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(fetched, local_factors)
            log(f"factors ({spec.strategy}) found in the lake at {factors_dir}")
        else:
            log(f"fitting {spec.strategy} factors on {n_train} training samples, {len(plan['modules'])} modules")
            torch.manual_seed(spec.seed)
            fit = dict(factors_name=key, dataset=train_set, per_device_batch_size=spec.train_batch_size,
                       factor_args=factor_args(spec))
            # fit_all_factors' three phases, each that the strategy needs, one at a time: each says when it starts and ends
            needs = FactorConfig.CONFIGS[spec.strategy]
            if not (needs.requires_covariance_matrices or needs.requires_eigendecomposition
                    or needs.requires_lambda_matrices):
                analyzer.fit_all_factors(**fit)  # no phase (identity): only the factor arguments scoring reads are saved
            if needs.requires_covariance_matrices:
                with phase(log, task, f"{spec.strategy} covariance matrices", n_train):
                    analyzer.fit_covariance_matrices(**fit)
            if needs.requires_eigendecomposition:
                with phase(log, task, f"{spec.strategy} eigendecomposition"):
                    analyzer.perform_eigendecomposition(factors_name=key, factor_args=fit["factor_args"])
            if needs.requires_lambda_matrices:
                with phase(log, task, f"{spec.strategy} lambda matrices", n_train):
                    analyzer.fit_lambda_matrices(**fit)
            copy_factors_to_lake(store, local_factors, factors_dir, {**lineage, "strategy": spec.strategy})
        fit_seconds = time.perf_counter() - started
        pending = group.pending_blocks()
        for qb, tb in pending:
            qs, ts = group.bounds(qb, tb)
            name = f"block-{qb}-{tb}"
            n_query = qs.stop - qs.start
            # each batch of queries is scored against every training sample of the block
            samples = n_query + -(-n_query // spec.query_batch_size) * (ts.stop - ts.start)
            with phase(log, task, f"scoring block ({qb}, {tb})", samples):
                analyzer.compute_pairwise_scores(
                    scores_name=name, factors_name=key, query_dataset=query_set, train_dataset=train_set,
                    per_device_query_batch_size=spec.query_batch_size, per_device_train_batch_size=spec.train_batch_size,
                    query_indices=list(range(qs.start, qs.stop)), train_indices=list(range(ts.start, ts.stop)),
                    score_args=score_args(spec))
            group.write_block(qb, tb, analyzer.load_pairwise_scores(name)["all_modules"].float().cpu().numpy())
            shutil.rmtree(analyzer.scores_output_dir(name), ignore_errors=True)
            log(f"scores block ({qb}, {tb}) written: queries {qs.start}-{qs.stop - 1}, "
                f"training samples {ts.start}-{ts.stop - 1} of {n_train}")
    group.finish(compute_seconds=round(time.perf_counter() - started, 3), fit_seconds=round(fit_seconds, 3),
                 lake_bytes=_bytes_under(store, factors_dir) + _bytes_under(store, path))
    log(f"influence ({spec.strategy}) of {n_train} training samples on {len(query_ids)} queries: {path}")
    return path


def _looks_complete(store: LakeStore, path: str) -> bool:
    """Whether the score group's attributes say complete (its factors are then not fetched until needed)."""
    try:
        attrs = read_json_attrs(store, f"{path}/zarr.json")
    except DamagedMetadata:
        return False  # named when the group is opened
    return bool(((attrs or {}).get("gradlake") or {}).get("complete"))


SCORE_ARRAYS = ("scores", "query", "train", "block_complete")


def _score_group(store: LakeStore, path: str, query_ids: list[str], keys: list[str], meta: dict,
                 train_block: int) -> ScoreGroup:
    """The score group to fill (reopened to resume); its damaged metadata is one error naming the file."""
    redo = (f"remove {public_url(store.url)}/{path} and rerun `gradlake influence` (its blocks are scored again), "
            "or run `gradlake verify`")
    for name in ("zarr.json", *(f"{array}/zarr.json" for array in SCORE_ARRAYS)):
        try:
            read_json(store, f"{path}/{name}")
        except DamagedMetadata as err:
            raise DamagedMetadata(f"{err}; {redo}") from None
    try:
        return ScoreGroup.create(store, path, query_ids, keys, meta, query_rows=max(1, len(query_ids)),
                                 train_cols=train_block)
    except LakeError:
        raise
    except (ValueError, KeyError, TypeError) as err:  # JSON that is not the Zarr metadata it was
        raise DamagedMetadata(f"damaged metadata: the score group {public_url(store.url)}/{path} cannot be opened "
                              f"({type(err).__name__}: {str(err)[:100]}); {redo}") from None


@contextmanager
def phase(log: Callable[[str], object], task, what: str, samples: int = 0, every: float | None = None) -> Iterator[None]:
    """Log a phase of Kronfluence's work: its start, samples through the loss every `every` seconds, its end.

    `samples` is how many passes of a sample through a loss the phase makes (0: none, e.g. an eigendecomposition);
    `task` is the Kronfluence task, which tells of each batch it sees."""
    progress = Progress(samples, "samples", log=log, every=PROGRESS_EVERY if every is None else every)
    log(f"{what}: started" + (f" ({samples} sample passes)" if samples else ""))
    task.on_batch = lambda n: progress.add(n, f"{what}: ")
    try:
        yield
    finally:
        task.on_batch = None
    log(f"{what}: done in {duration(progress.elapsed)}")


def _bytes_under(store: LakeStore, relative: str) -> int:
    try:
        return int(sum(store.fs.du(store.path(relative), total=False).values()))
    except FileNotFoundError:
        return 0


@task(name="plan-influence", cache_policy=NONE)
def plan_influence_task(spec: InfluenceSpec) -> dict:
    """Model config, data, tracked modules: checked before any factor is fitted or anything written."""
    plan = plan_influence(spec)
    get_run_logger().info("%s influence: %d training samples x %d queries, %d tracked modules", spec.strategy,
                          plan["n_train"], plan["n_query"], len(plan["modules"]))
    return plan


@task(name="influence", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_bad_input)
def influence_task(spec: InfluenceSpec) -> str:
    """Fit or reuse the factors, score the blocks the lake lacks; a retry resumes at the first missing block."""
    return compute_influence(spec, log=get_run_logger().info)
