"""The tracing stage: one base and one candidate model, their statistics and p-values, results into the lake."""

from __future__ import annotations

import copy
import io
import math
from typing import Literal

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake import layout
from gradlake.lake.manifest import MANIFEST, entry, write_manifest
from gradlake.lake.results import read_result_table, write_result
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.lineage import gradlake_version, lake_keys
from gradlake.tasks.common.model import ModelSpec, check_model, lake_names, parameter_shapes, resolved_commit
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.common.weights import check_weights
from gradlake.tasks.tracing.connectivity import barrier, loss_path, perplexity
from gradlake.tasks.tracing.permutation import (TRACING_ARCHITECTURES, TracingError, align, check_comparable, decoder_layers,
                                                permute_model, random_permutation)
from gradlake.tasks.tracing.report import summary_texts, tracing_figures, tracing_html, tracing_markdown
from gradlake.tasks.tracing.statistics import (embedding_cosine, layer_cosines, matching_test, mean_weight_cosine,
                                               null_statistics, permutation_p_value, smallest_p_value, weight_cosines)


# -- the stage: one base and one candidate, results into the lake ---------------------------------

STATISTICS = ("cos", "emb", "mode")
MATCHING_TEST = "matching (gate vs up, Fisher)"
ALPHA = 0.01  # the level at which a p-value reads "derived"


class TraceSettings(BaseModel):
    """How a candidate is compared with its base: everything but the two models."""

    model_config = ConfigDict(extra="forbid")

    statistics: list[Literal["cos", "emb", "mode"]] = Field(default=list(STATISTICS), title="Statistics", description="'cos': cosine similarity of the weight matrices; 'emb': of the input embeddings, token by token; 'mode': the loss along the straight line between the two models (mode connectivity). Perplexity of both models is always reported.")
    permute: bool = Field(default=False, title="Permute the candidate first", description="Apply a random function-preserving permutation (residual dimensions and MLP units) to the candidate before anything: the control that fools an unaligned comparison.")
    permute_seed: int = Field(default=0, ge=0, title="Permutation seed", description="Seed of that permutation (recorded).")
    align: bool = Field(default=True, title="Align", description="Also align the candidate to the base (Hungarian algorithm on embedding columns, then each MLP's gate and up rows) and report every statistic aligned, with the matching test's p-value.")
    mode_attention: bool = Field(default=True, title="Attention on the path", description="Attention weights move along the interpolation path (off: they keep the base's values).")
    mode_embeddings: bool = Field(default=True, title="Embeddings on the path", description="Input and output embeddings move along the path (off: they keep the base's values).")
    dataset: str = Field(default="probe", title="Dataset", description="Dataset in the lake on which the losses and perplexities are measured.")
    variant: str = Field(default="original", title="Variant", description="Its variant.")
    paradigm: Literal["sft", "pre"] = Field(default="sft", title="Loss on", description="'sft': assistant tokens only; 'pre': every token (the extraction's loss convention).")
    n_samples: int = Field(default=64, ge=1, title="Samples", description="The first this many samples of the dataset.")
    max_length: int = Field(default=1024, ge=2, title="Max length (tokens)", description="Tokens per sample at most.")
    batch_size: int = Field(default=8, ge=1, title="Batch size", description="Samples per forward pass.")
    points: int = Field(default=11, ge=2, title="Interpolation points", description="Points on the line from the base (0) to the candidate (1), the end points included.")
    permutations: int = Field(default=100, ge=1, title="Permutations", description="Random permutations in each permutation test. The verdict needs p < 0.01: unaligned, the smallest p-value is 1 / (permutations + 1), so 100 or more; aligned, the matching test combines the layers' p-values and reaches it with fewer (5 for 16 layers). A count that cannot reach it is refused.")
    seed: int = Field(default=0, ge=0, title="Test seed", description="Seed of the permutation tests' draws (recorded).")

    _names = layout.name_fields("dataset", "variant")


LAKE_HELP = ("Lake URL: the dataset is read from it, the results written to it (s3://bucket/prefix, or file:///path on "
             "storage every worker shares).")


class _Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: ModelSpec = Field(title="Base model", description="The model the candidate may derive from (any checkpoint).")
    candidate: ModelSpec = Field(title="Candidate model", description="A fine-tune, a later checkpoint, or a model of unknown origin, of the same architecture and size.")
    lake: str = Field(title="Lake", description=LAKE_HELP)


class TraceSpec(TraceSettings, _Pair):  # the models and the lake come first in the Prefect form
    """Is `candidate` derived from `base`?  Everything one tracing run needs."""

    @property
    def model(self) -> ModelSpec:  # run names and logs name the candidate
        return self.candidate


def base_dir(base: ModelSpec) -> str:
    """``tracing/<base>/<checkpoint>``: every candidate traced against this base, and their summary table."""
    return layout.tracing_base_dir(*lake_keys(base))


def tracing_dir(spec: TraceSpec) -> str:
    """``tracing/<base>/<checkpoint>/<candidate>/<checkpoint>`` with the lake's model and checkpoint keys; the control
    (`permute`) beside it, in ``<checkpoint>-permuted-s<seed>``."""
    return layout.tracing_dir(*lake_keys(spec.base), *lake_keys(spec.candidate),
                              permute_seed=spec.permute_seed if spec.permute else None)


def control_note(permute_seed: int | None) -> str:
    """What a control run's verdict and report say; empty for a real run."""
    return "" if permute_seed is None else f"control: candidate permuted with seed {permute_seed}"


def deciding_test(spec: TraceSettings) -> str | None:
    """The test whose p-value gives the verdict: the matching test when aligned, the unaligned permutation tests
    otherwise; none when only statistics without a p-value are asked for."""
    if not {"cos", "emb"} & set(spec.statistics):
        return None
    return "matching" if spec.align else "permutation"


def smallest_p(spec: TraceSettings, layers: int) -> float | None:
    """The smallest p-value the deciding test can give with `spec.permutations` on a model of `layers` layers."""
    test = deciding_test(spec)
    if test is None:
        return None
    return smallest_p_value(spec.permutations, layers if test == "matching" else None)


def _fewest_permutations(spec: TraceSettings, layers: int) -> int:
    n = 1
    while smallest_p(spec.model_copy(update={"permutations": n}), layers) >= ALPHA:
        n += 1
    return n


def summary_table(store: LakeStore, base: ModelSpec) -> pd.DataFrame:
    """One row per candidate traced against `base` in the lake: its verdict, p-value and main statistics."""
    from gradlake.lake.evaluations import list_tracing

    prefix = base_dir(base) + "/"
    rows = []
    for path, meta in list_tracing(store):
        if not path.startswith(prefix):
            continue
        results = read_result_table(store, path, "results", what="tracing result")
        values = {(f"{r.statistic}{'_aligned' if r.aligned else ''}"): r.value for r in results.itertuples()}
        candidate = meta["lineage"]["candidate"]
        seed = meta["lineage"].get("permute_seed")
        rows.append({"candidate": candidate["model"], "checkpoint": candidate["checkpoint"], "path": path,
                     "control": seed is not None, "permuted_seed": seed, "verdict": meta["verdict"], "derived": meta["summary"]["derived"],
                     "p_value": meta["summary"]["p_value"], "test": meta["summary"]["test"], **values,
                     "created_at": meta["lineage"]["created_at"]})
    table = pd.DataFrame(rows)
    if len(table):
        table["permuted_seed"] = table["permuted_seed"].astype("Int64")
    return table


def write_summary(store: LakeStore, base: ModelSpec) -> str:
    """``tracing/<base>/<checkpoint>/summary.parquet``, ``summary.md`` and ``summary.html`` over every candidate
    traced so far."""
    table = summary_table(store, base)
    directory = base_dir(base)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    files = {"summary.parquet": buffer.getvalue()} | {
        name: text.encode() for name, text in
        summary_texts(f"Candidates traced against {base.model}@{base.checkpoint or 'main'}", table).items()}
    try:  # the old digests go first: a run stopped part-way leaves the summary unchecked, never falsely damaged
        store.fs.rm_file(store.path(f"{directory}/{MANIFEST}"))
    except FileNotFoundError:
        pass
    for name, data in files.items():
        store.fs.pipe_file(store.path(f"{directory}/{name}"), data)
    write_manifest(store.fs, store.path(directory), {name: entry(data) for name, data in files.items()})
    return directory


def plan_trace(spec: TraceSpec) -> dict:
    """Every input checked from configs and the lake, before any weight is loaded or anything written."""
    from gradlake.lake.datasets import dataset_meta

    unknown = sorted(set(spec.statistics) - set(STATISTICS))
    if unknown or not spec.statistics:
        raise TracingError(f"statistics {spec.statistics} must be one or more of {list(STATISTICS)}")
    shapes = []
    for role, model in (("base", spec.base), ("candidate", spec.candidate)):
        model = model.resolved()
        config = check_model(model)
        if config.model_type not in TRACING_ARCHITECTURES:  # from the config: before any weight is read
            raise TracingError(f"the {role} {model.model!r} is a {(config.architectures or [type(config).__name__])[0]}; "
                               f"tracing knows {', '.join(TRACING_ARCHITECTURES.values())} only")
        shapes.append(((config.architectures or [type(config).__name__])[0], parameter_shapes(model, config)))
    (arch_b, shapes_b), (arch_c, shapes_c) = shapes
    layers = config.num_hidden_layers
    smallest = smallest_p(spec, layers)
    if smallest is not None and smallest >= ALPHA:
        test = ("the matching test (Fisher's method over {layers} layers)".format(layers=layers)
                if deciding_test(spec) == "matching" else "the permutation test")
        raise TracingError(f"permutations {spec.permutations} cannot give p < {ALPHA}: the smallest p-value of {test} "
                           f"with {spec.permutations} permutations is {smallest:.2g}; use at least "
                           f"{_fewest_permutations(spec, layers)}")
    if arch_b != arch_c:
        raise TracingError(f"the base is a {arch_b} and the candidate a {arch_c}; tracing compares models of one architecture")
    if shapes_b != shapes_c:
        differ = sorted(set(shapes_b) ^ set(shapes_c)) or [n for n in shapes_b if shapes_b[n] != shapes_c[n]]
        raise TracingError(f"the base and the candidate differ in their parameters (first: {differ[0]!r}: "
                           f"{shapes_b.get(differ[0])} vs {shapes_c.get(differ[0])}); tracing compares models of one size")
    store = LakeStore(spec.lake)
    meta = dataset_meta(store, spec.dataset, spec.variant)  # a missing dataset or variant is named here
    for model in (spec.base, spec.candidate):
        check_weights(model.resolved(), check_model(model.resolved()))
    store.check_writable()
    return {"architecture": arch_b, "dataset_version": meta["version"], "dataset_hash": meta["content_hash"],
            "n_parameters": int(sum(math.prod(s) for s in shapes_b.values()))}


def evaluation_batches(spec: TraceSpec, tokenizer, config, log=print) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gradlake.lake.datasets import read_dataset
    from gradlake.tasks.common.loss import encode_sample, pad_batch
    from gradlake.tasks.common.model import capped_length

    frame = read_dataset(LakeStore(spec.lake), spec.dataset, spec.variant).head(spec.n_samples)
    max_length, capped = capped_length(spec.max_length, config, spec.base.model)
    if capped:
        log(capped)
    encoded = [encode_sample(tokenizer, chat, spec.paradigm, max_length) for chat in frame["messages"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [pad_batch(encoded[i:i + spec.batch_size], pad) for i in range(0, len(encoded), spec.batch_size)]


def trace_pair(spec: TraceSpec, log=print) -> tuple[dict[str, pd.DataFrame], dict]:
    """Load both models, compute every statistic asked for; returns (tables, summary)."""
    import time

    from gradlake.tasks.common.model import load_model, load_tokenizer

    started = time.monotonic()
    base = load_model(spec.base.resolved())
    candidate = load_model(spec.candidate.resolved())
    check_comparable(base, candidate)
    if spec.permute:  # a copy: the loaded model is cached for the next run in this process
        candidate = permute_model(copy.deepcopy(candidate), random_permutation(candidate, spec.permute_seed))
    batches = evaluation_batches(spec, load_tokenizer(spec.base.resolved()), base.config, log)
    aligned = None
    if spec.align:
        log("aligning the candidate to the base (Hungarian algorithm)")
        aligned = align(base, candidate)
    rows, curves = [], []
    variants = [(False, None)] + ([(True, aligned)] if spec.align else [])

    def row(statistic, is_aligned, value, p, test, n=None):
        rows.append({"statistic": statistic, "aligned": is_aligned, "value": float(value),
                     "p_value": None if p is None else float(p), "test": test, "permutations": n})

    matching = None
    if spec.align and ({"cos", "emb"} & set(spec.statistics)):
        log(f"matching test over {len(decoder_layers(base))} layers, {spec.permutations} permutations each")
        matching = matching_test(base, candidate, spec.permutations, spec.seed)
    for name, statistic in (("cos", mean_weight_cosine), ("emb", embedding_cosine)):
        if name not in spec.statistics:
            continue
        for is_aligned, permutation in variants:
            value = statistic(base, candidate, permutation)
            if is_aligned:
                row(name, True, value, matching["p_value"], MATCHING_TEST, spec.permutations)
            else:
                log(f"{name}: permutation test, {spec.permutations} permutations")
                null = null_statistics(statistic, base, candidate, spec.permutations, spec.seed)
                row(name, False, value, permutation_p_value(value, null), "permutation", spec.permutations)
    if matching is not None:  # the deciding test's own statistic: the share of units both matchings agree on
        share = sum(matching["agreements"]) / (matching["units"] * len(matching["agreements"]))
        row("matching", True, share, matching["p_value"], MATCHING_TEST, spec.permutations)
    if "mode" in spec.statistics:
        for is_aligned, permutation in variants:
            log(f"mode connectivity ({'aligned' if is_aligned else 'unaligned'}): {spec.points} points")
            path = loss_path(base, candidate, batches, spec.points, permutation, spec.mode_attention, spec.mode_embeddings)
            curves += [{"aligned": is_aligned, "alpha": a, "loss": loss} for a, loss in path]
            row("mode", is_aligned, barrier(path), None, "none (loss barrier)")
    for role, model in (("base", base), ("candidate", candidate)):
        value = perplexity(model, batches)
        row(f"perplexity:{role}", False, value, None, "none")
    unaligned = weight_cosines(base, candidate)
    tensors = pd.DataFrame({"tensor": list(unaligned), "cosine": list(unaligned.values())})
    layers = pd.DataFrame({"layer": range(len(decoder_layers(base))), "cos": layer_cosines(base, unaligned)})
    if spec.align:
        aligned_cosines = weight_cosines(base, candidate, aligned)
        tensors["cosine_aligned"] = list(aligned_cosines.values())
        layers["cos_aligned"] = layer_cosines(base, aligned_cosines)
    if matching is not None:
        layers["units"] = matching["units"]
        layers["agreements"] = matching["agreements"]
        layers["null_mean"] = [float(np.mean(null)) for null in matching["null"]]
        layers["null_max"] = [int(max(null)) for null in matching["null"]]
        layers["p_value"] = matching["p_layers"]
    results = pd.DataFrame(rows)
    results["permutations"] = results["permutations"].astype("Int64")
    decisive = results[(results["aligned"] == spec.align) & results["p_value"].notna()]
    p = float(decisive["p_value"].min()) if len(decisive) else None
    summary = {"p_value": p, "derived": None if p is None else p < ALPHA, "test": None if p is None else
               decisive.loc[decisive["p_value"].idxmin(), "test"], "seconds": time.monotonic() - started,
               "matching_agreements": None if matching is None else matching["agreements"],
               "matching_units": None if matching is None else matching["units"], "permutations": spec.permutations,
               "smallest_p": smallest_p(spec, len(decoder_layers(base))),
               "permute_seed": spec.permute_seed if spec.permute else None}
    tables = {"results": results, "path": pd.DataFrame(curves, columns=["aligned", "alpha", "loss"]), "tensors": tensors,
              "layers": layers}
    return tables, summary


def verdict(summary: dict) -> str:
    control = control_note(summary.get("permute_seed"))
    control = f"; {control}" if control else ""
    if summary["p_value"] is None:
        return f"no test was run (statistics without a p-value only){control}"
    if summary["derived"]:
        return f"derived (p = {summary['p_value']:.2g} < {ALPHA}, {summary['test']} test){control}"
    if summary.get("smallest_p") is not None and summary["smallest_p"] >= ALPHA:
        return (f"undecided ({summary['permutations']} permutations cannot reach p < {ALPHA}: the smallest is "
                f"{summary['smallest_p']:.2g}; p = {summary['p_value']:.2g}, {summary['test']} test){control}")
    return f"no evidence of derivation (p = {summary['p_value']:.2g}, {summary['test']} test){control}"


def run_trace(spec: TraceSpec, log=print, planned: dict | None = None) -> str:
    """Check (unless `planned` is `plan_trace`'s result already), compute, write `tracing/...` (tables, plot, report,
    meta.json last); returns the directory."""
    import datetime as dt

    planned = planned or plan_trace(spec)
    directory = tracing_dir(spec)
    tables, summary = trace_pair(spec, log)
    plots = tracing_figures(tables)
    lineage = {role: {"model": lake_names(m)[0], "checkpoint": lake_names(m)[1], "resolved_commit": resolved_commit(m.resolved())}
               for role, m in (("base", spec.base), ("candidate", spec.candidate))}
    meta = {"lineage": lineage | {"architecture": planned["architecture"], "dataset": spec.dataset, "variant": spec.variant,
                                  "dataset_version": planned["dataset_version"], "dataset_hash": planned["dataset_hash"],
                                  "permute_seed": spec.permute_seed if spec.permute else None, "test_seed": spec.seed,
                                  "settings": spec.model_dump(exclude={"lake", "base", "candidate"}),
                                  "gradlake_version": gradlake_version(),
                                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
            "summary": summary, "verdict": verdict(summary), "tables": sorted(tables), "plots": sorted(plots)}
    texts = {"report.md": tracing_markdown(meta, tables, sorted(plots)), "report.html": tracing_html(meta, tables, plots)}
    write_result(LakeStore(spec.lake), directory, tables=tables, plots=plots, texts=texts, meta=meta)
    log(f"{verdict(summary)}; results at {spec.lake}/{directory}")
    return directory


@task(name="plan-trace", cache_policy=NONE)
def plan_trace_task(spec: TraceSpec) -> dict:
    """Both configs, their shapes and the dataset checked before any weight is loaded."""
    plan = plan_trace(spec)
    get_run_logger().info("tracing a %s of %d parameters on %s/%s (version %s)", plan["architecture"],
                          plan["n_parameters"], spec.dataset, spec.variant, plan["dataset_version"])
    return plan


@task(name="trace", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input)
def trace_task(spec: TraceSpec, planned: dict | None = None) -> str:
    return run_trace(spec, log=get_run_logger().info, planned=planned)
