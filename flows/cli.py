"""The `gradlake` command: each subcommand starts a flow with named, validated parameters."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from pydantic import ValidationError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="gradlake: per-sample gradients of language models in a Zarr lake.")
dataset_app = typer.Typer(no_args_is_help=True, help="Probe datasets in the lake.")
app.add_typer(dataset_app, name="dataset")


def _fail(err: Exception) -> None:
    text = _validation_line(err) if isinstance(err, ValidationError) else (_explain(err) or err)
    typer.secho(f"error: {text}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _validation_line(err: ValidationError) -> str:
    """A pydantic error as one line per bad field: where, what is wrong, what was given (no docs link)."""
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or err.title
        given = problem.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        parts.append(f"{where}: {problem['msg']}{shown}")
    return "; ".join(parts)


def _explain(err: BaseException) -> str | None:
    """One line for a service that does not answer (Prefect server, S3 endpoint) or missing credentials; None for others."""
    from gradlake.lake.store import error_chain, public_url, storage_problem

    chain = error_chain(err)
    api = os.environ.get("PREFECT_API_URL")
    if not api and "prefect.settings" in sys.modules:  # set in a Prefect profile rather than the environment
        api = sys.modules["prefect.settings"].get_current_settings().api.url
    for e in chain:
        to_api = type(e).__name__ in ("ConnectError", "ConnectTimeout") and _request_url(e).startswith((api or " ").rstrip("/"))
        if api and (to_api or (isinstance(e, RuntimeError) and str(e).startswith("Failed to reach API at"))):
            why = "connection refused" if any("refused" in str(c).lower() for c in chain) else "no answer"
            return (f"no Prefect server answers at {public_url(api)}: {why}; start one with `prefect server start` "
                    "or unset PREFECT_API_URL")
    return storage_problem(err, None)


def _request_url(err: BaseException) -> str:
    try:
        return str(err.request.url)  # httpx's errors carry the request they failed on
    except (AttributeError, RuntimeError):
        return ""


def _lake(lake: Optional[str]) -> str:
    from gradlake.lake.store import default_lake

    return lake or default_lake()


@app.command()
def extract(
    model: str = typer.Option(..., help="Hugging Face id, local directory, or preset (amd-olmo-1b-sft, olmo-2-7b-sft)."),
    checkpoint: Optional[str] = typer.Option(None, help="Hub revision or checkpoint subdirectory."),
    dataset: str = typer.Option("probe", help="Dataset name in the lake."),
    variant: str = typer.Option("original", help="Dataset variant."),
    paradigm: str = typer.Option("sft", help="sft (assistant tokens) or pre (all tokens)."),
    layers: list[str] = typer.Option([], "--layers", "-l", help="Glob over parameter names; repeat for several. None: all."),
    chat_template: str = typer.Option("tokenizer", help="tokenizer (its own template), tulu (the thesis's format) or a Jinja file."),
    labels: str = typer.Option("assistant", help="sft loss on every assistant turn (assistant) or the last one only (last_assistant)."),
    target: str = typer.Option("parameters", help="Gradient with respect to: parameters (the --layers weights), inputs_embeds (the input embeddings per token, max-length x hidden a sample) or inputs_embeds_mean (their mean over the sample's tokens)."),
    mode: str = typer.Option("store", help="store, mean or mean_normalized."),
    shard_size: int = typer.Option(64, help="Samples per shard."),
    batch_size: int = typer.Option(8, help="Samples per backward pass at most (divides shard size)."),
    token_budget: int = typer.Option(4096, help="Tokens per backward pass at most, padding included; samples are sorted by length and packed. 0: batches of --batch-size in dataset order."),
    max_length: int = typer.Option(1024, help="Tokens per sample at most."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16."),
    store_dtype: str = typer.Option("float32", help="Stored gradient dtype: float32, float16 or bfloat16 (kept as raw bits, read back as float32)."),
    object_mb: int = typer.Option(0, help="Lake objects of up to this many MiB, each a row-chunk's column chunks of a wide tensor (Zarr shards; fewer S3 requests at 7B). 0: one object per 16 MiB chunk."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own code."),
    allow_pickled_weights: bool = typer.Option(False, help="Load pickled weights (pytorch_model.bin) of a checkpoint without safetensors."),
    project: list[str] = typer.Option([], "--project", "-p", help="Project on the fly: KIND:SCOPE:DIM[:SEED] (e.g. rademacher:flat:8192) or kronecker:KOUTxKIN[:SEED]; repeat for several."),
    keep_gradients: bool = typer.Option(True, help="Store the full gradients too (--no-keep-gradients: only the projections)."),
    lake: Optional[str] = typer.Option(None, help="Lake URL (default: $GRADLAKE_LAKE or ./demo-lake)."),
) -> None:
    """Extract per-sample gradients into the lake (the extract-gradients flow)."""
    from gradlake.flows.extract import extract_gradients
    from gradlake.tasks.gradients.extract import ExtractionSpec, plan_extraction
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.projection.projectors import parse_projection

    try:
        spec = ExtractionSpec(
            model=ModelSpec(model=model, checkpoint=checkpoint, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                            allow_pickled_weights=allow_pickled_weights),
            dataset=dataset, variant=variant, paradigm=paradigm, layers=layers, chat_template=chat_template, labels=labels,
            target=target, mode=mode, shard_size=shard_size,
            batch_size=batch_size, token_budget=token_budget or None, max_length=max_length, store_dtype=store_dtype,
            lake=_lake(lake), projections=[parse_projection(p) for p in project], keep_gradients=keep_gradients,
            object_mb=object_mb,
        )
        plan_extraction(spec)  # every input checked here, before Prefect starts and before any write
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)
    state = extract_gradients(spec, return_state=True)
    if state.is_failed():  # what only the weights can show (NaN or Inf gradients) ends in one line too
        _fail(state.result(raise_on_failure=False))
    typer.echo(f"gradients: {spec.lake}/{state.result()}")


@dataset_app.command("probe")
def dataset_probe(lake: Optional[str] = typer.Option(None, help="Lake URL.")) -> None:
    """Store the bundled probe set (variants original, paraphrased) as dataset 'probe'."""
    from gradlake.tasks.data.probes import store_probe_set

    try:
        variants = store_probe_set(_lake(lake))
    except (ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"dataset 'probe' ({', '.join(variants)}) stored in {_lake(lake)}")


@app.command()
def project(
    gradients: str = typer.Option(..., help="Path of a stored gradient group (see `gradlake catalog`)."),
    kind: str = typer.Option("rademacher", help="rademacher, gaussian, sparse or kronecker."),
    dim: int = typer.Option(..., help="Output dimension (per tensor for per_tensor scope, in total otherwise; k_out*k_in for kronecker)."),
    seed: int = typer.Option(0, help="Seed of the random matrix."),
    scope: str = typer.Option("per_tensor", help="per_tensor, proportional or flat."),
    factors: Optional[str] = typer.Option(None, help="kronecker only: KOUTxKIN, e.g. 64x32 (default: sqrt(dim) each)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    lake: Optional[str] = typer.Option(None, help="Lake URL."),
) -> None:
    """Project stored per-sample gradients (the project-gradients flow)."""
    from gradlake.flows.project import project_gradients
    from gradlake.tasks.projection.stored import ProjectSpec, create_projection_group
    from gradlake.tasks.projection.projectors import ProjectionSpec

    try:
        pair = None
        if factors:
            pair = tuple(int(v) for v in factors.split("x") if v.isdigit())
            if len(pair) != 2 or factors.count("x") != 1:
                raise ValueError(f"factors {factors!r} must be KOUTxKIN, e.g. 64x32")
        spec = ProjectSpec(gradients=gradients, projection=ProjectionSpec(kind=kind, dim=dim, seed=seed, scope=scope, factors=pair),
                           device=device, lake=_lake(lake))
        create_projection_group(spec)  # checks every setting against the stored group before any work
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)
    typer.echo(f"projections: {spec.lake}/{project_gradients(spec)}")


def _model_at(text: str):
    from gradlake.tasks.common.model import ModelSpec

    model, _, checkpoint = text.rpartition("@") if "@" in text else (text, "", "")
    return ModelSpec(model=model, checkpoint=checkpoint or None)


@dataset_app.command("create")
def dataset_create(
    name: str = typer.Option(..., help="Dataset name in the lake."),
    source: str = typer.Option(..., help="Hugging Face dataset id, local dataset directory, or .jsonl/.parquet/.arrow file."),
    config: Optional[str] = typer.Option(None, help="Dataset configuration (subset)."),
    split: str = typer.Option("train", help="Split to read."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the dataset."),
    n: Optional[int] = typer.Option(None, help="Samples to take (default: all usable rows)."),
    sampling: str = typer.Option("random", help="random (seeded) or first."),
    seed: int = typer.Option(0, help="Seed of the random draw."),
    paraphrase: bool = typer.Option(False, help="Make the 'paraphrased' variant through an OpenAI-compatible API."),
    paraphrase_model: str = typer.Option("gpt-4o-mini", help="Chat model that paraphrases."),
    base_url: Optional[str] = typer.Option(None, help="API base URL (vLLM, Ollama, ...); default OpenAI's."),
    temperature: float = typer.Option(0.7, help="Paraphrasing temperature."),
    paraphrase_seed: Optional[int] = typer.Option(0, help="Seed sent to the API."),
    max_concurrency: int = typer.Option(8, help="Requests in flight at most."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="NAME of the environment variable holding the API key."),
    api_key_block: Optional[str] = typer.Option(None, help="Name of a Prefect Secret block holding the API key."),
    generate: list[str] = typer.Option([], "--generate", help="MODEL[@CHECKPOINT] that answers each prompt itself; repeatable."),
    generate_from: str = typer.Option("paraphrased", help="Variant whose prompts are answered: paraphrased or original."),
    max_new_tokens: int = typer.Option(256, help="Longest generated answer, in tokens."),
    lake: Optional[str] = typer.Option(None, help="Lake URL."),
) -> None:
    """Create a probe set in the lake: original, paraphrased, model-generated (the create-dataset flow)."""
    from gradlake.flows.dataset import DatasetSpec, check_dataset_spec, create_dataset
    from gradlake.tasks.data.paraphrase import ParaphraseSpec
    from gradlake.tasks.data.sources import SourceSpec, load_source

    try:
        spec = DatasetSpec(
            name=name,
            source=SourceSpec(source=source, config=config, split=split, revision=revision, n=n, sampling=sampling, seed=seed),
            paraphrase=ParaphraseSpec(model=paraphrase_model, base_url=base_url, temperature=temperature,
                                      seed=paraphrase_seed, max_concurrency=max_concurrency, api_key_env=api_key_env,
                                      api_key_block=api_key_block) if paraphrase else None,
            generate=[_model_at(g) for g in generate], generate_from=generate_from, max_new_tokens=max_new_tokens,
            lake=_lake(lake),
        )
        check_dataset_spec(spec)
        load_source(spec.source)  # the source read and checked here, before Prefect starts: a bad file is one line
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)
    state = create_dataset(spec, return_state=True)
    if state.is_failed():
        _fail(state.result(raise_on_failure=False))
    for variant, version in state.result().items():
        typer.echo(f"{name}/{variant}: version {version}")


@app.command()
def catalog(lake: Optional[str] = typer.Option(None, help="Lake URL.")) -> None:
    """List everything in a lake."""
    import pandas as pd

    from gradlake.lake import open_lake

    try:
        opened = open_lake(_lake(lake))
        frame = opened.catalog()
    except (ValueError, OSError) as err:
        _fail(err)
    if frame.empty:
        typer.echo(f"lake {opened.url} is empty: no dataset, gradient group or evaluation yet")
        return
    with pd.option_context("display.width", 220, "display.max_columns", 13, "display.max_colwidth", 40):
        typer.echo(frame[["kind", "model", "checkpoint", "dataset", "variant", "paradigm", "target", "mode", "projection",
                          "n_samples", "chunks_done", "chunks_total", "complete"]].to_string(index=False))
    damaged = frame[frame["damaged"].notna()]
    for _, row in damaged.iterrows():  # listed above as incomplete; the reason in full, one line each
        typer.secho(f"damaged: {row['path']}: {row['damaged']}", fg=typer.colors.RED, err=True)
    if len(damaged):
        typer.secho("`gradlake verify` checks every chunk too", err=True)


@app.command()
def demo(
    lake: Optional[str] = typer.Option(None, help="Lake URL (default: $GRADLAKE_LAKE or ./demo-lake)."),
    train_samples: Optional[int] = typer.Option(None, help="Probe originals the tiny OLMo-2 is trained on [default: 32]."),
    epochs: Optional[int] = typer.Option(None, help="Passes over them [default: 60]."),
    checkpoints: Optional[int] = typer.Option(None, help="Checkpoints evaluated besides step 0 [default: 2]."),
    subsets: Optional[int] = typer.Option(None, help="LDS retrainings (random halves of the training set) [default: 16]."),
    seeds: Optional[int] = typer.Option(None, help="Data-order seeds per subset, losses averaged [default: 1]."),
    queries: Optional[int] = typer.Option(None, help="Held-out queries, and paraphrase queries [default: 16]."),
    full: bool = typer.Option(False, "--full", help="The powered benchmark: 64 training samples, 40 subsets x 3 seeds, "
                                                    "48 queries per set (about 45 minutes on two cores); other options still win."),
) -> None:
    """Offline: train a tiny OLMo-2 on part of the probe set, then compare every attribution method on it against
    retraining, on held-out queries and on paraphrases."""
    import pandas as pd

    from gradlake.flows.demo import DemoSettings, demo_pipeline
    from gradlake.lake import open_lake
    from gradlake.lake.store import LakeStore, normalize_url

    given = {"train_samples": train_samples, "epochs": epochs, "checkpoints": checkpoints, "n_subsets": subsets,
             "retrain_seeds": seeds, "queries": queries}
    base = DemoSettings.powered() if full else DemoSettings()
    try:
        settings = DemoSettings(**{**base.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    except ValidationError as err:
        _fail(err)
    url = normalize_url(_lake(lake))
    result = demo_pipeline(url, settings=settings)
    store = LakeStore(url)
    frame = open_lake(url).catalog()
    grads = frame[frame["kind"] == "gradients"]
    typer.echo("")
    typer.echo(f"lake: {url}")
    typer.echo(f"  {len(frame[frame['kind'] == 'dataset'])} dataset variants, {len(grads)} gradient groups "
               f"({int(grads['complete'].sum())} complete)")
    run = result["run"]
    typer.echo("")
    typer.echo(f"training: tiny OLMo-2 from its random initialisation on {len(run['keep'])} probe originals, "
               f"{run['epochs']} epochs -> {run['output']}")
    quality = pd.DataFrame(result["quality"])
    quality = quality[quality["variant"] == "original"].sort_values("checkpoint")
    losses = _training_losses(run["output"])
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        shown = quality[["checkpoint", "rouge_l", "bleu_corpus"]].assign(
            train_loss=[losses.get(c, float("nan")) for c in quality["checkpoint"]])
        typer.echo(shown.to_string(index=False))
    _print_headline(url, result["selection"])
    final = result["benchmarks"][max(result["benchmarks"])]
    for label, title in (("held_out", "held-out queries (never trained on)"),
                         ("paraphrased", "paraphrases of training samples (fact tracing)")):
        _print_benchmark(store, url, final[label], f"attribution benchmark of the final checkpoint, {title}")
    curve = pd.read_parquet(store.fs.open(store.path(f"{result['curve']}/curve.parquet"), "rb"))
    typer.echo("")
    typer.echo(f"across training, held-out LDS ({url}/{result['curve']}/curve.png):")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        keep = ["step"] + [c for c in curve if c.startswith("top1 ")] + [
            c for c in ("lds influence-ekfac", "lds grad-dot", "lds bm25", "lds random") if c in curve]
        typer.echo(curve[keep].to_string(index=False, na_rep=""))
    typer.echo("read it with: python -c \"from gradlake.lake import open_lake; print(open_lake('%s').catalog())\"" % url)
    typer.echo("or open notebooks/explore_lake.ipynb")


def _print_benchmark(store, url: str, directory: str, title: str) -> None:
    """A benchmark's protocol lines, its table, and what its intervals support."""
    import json

    import pandas as pd

    from gradlake.tasks.attribution.benchmark import read_benchmark
    from gradlake.tasks.evaluate.report import attribution_summary

    table = read_benchmark(store, directory)
    meta = json.loads(store.fs.cat_file(store.path(f"{directory}/meta.json")))
    summary = attribution_summary(table, meta)
    typer.echo("")
    typer.echo(f"{title} (report: {url}/{directory}/report.html)")
    for line in summary[:3]:
        typer.echo(f"  {line}")
    columns = [c for c in ("method", "lds", "lds_ci_low", "lds_ci_high", "separated_from_next", "lds_beyond_source",
                           "top1_paraphrased", "top1_model_generated") if c in table and table[c].notna().any()]
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.float_format", "{:.3f}".format):
        typer.echo(table[columns].to_string(index=False, na_rep=""))
    for line in summary[3:]:
        typer.echo(f"  {line}")


def _training_losses(output: str) -> dict[str, float]:
    """Per checkpoint of a local training run: the mean loss of its last ten steps (from its lineage record)."""
    import json
    from pathlib import Path

    out = {}
    for record in Path(output).glob("checkpoint-*/gradlake_train.json"):
        losses = json.loads(record.read_text()).get("recent_losses") or []
        if losses:
            out[record.parent.name] = sum(losses[-10:]) / len(losses[-10:])
    return out


def _print_headline(url: str, path: str) -> None:
    import pandas as pd

    from gradlake.lake.evaluations import read_evaluation
    from gradlake.lake.store import LakeStore
    from gradlake.tasks.evaluate.report import headline

    table = headline(read_evaluation(LakeStore(url), path))
    typer.echo("")
    typer.echo(f"select vs project ({path}; cosine; report: {url}/{path}/report.html)")
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.max_colwidth", 60,
                           "display.float_format", "{:.3f}".format):
        blank = {c: table[c].astype(object).where(table[c].notna(), "") for c in table
                 if not pd.api.types.is_float_dtype(table[c])}  # a baseline has no n_values: empty, not <NA>
        typer.echo(table.assign(**blank).to_string(index=False, na_rep=""))


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Option(..., help="Model as given to the extraction (id, directory or preset)."),
    checkpoint: Optional[str] = typer.Option(None, help="Hub revision or checkpoint subdirectory."),
    dataset: str = typer.Option("probe", help="Dataset name in the lake."),
    query: list[str] = typer.Option(["paraphrased", "model_generated"], "--query", "--queries", "-q", help="Query variant; repeatable."),
    paradigm: str = typer.Option("sft", help="Paradigm of the gradient groups."),
    target: str = typer.Option("parameters", help="Extraction target of the gradient groups: parameters, inputs_embeds or inputs_embeds_mean."),
    dense_baseline: bool = typer.Option(True, help="Also rank by all-MiniLM-L6-v2 sentence embeddings."),
    greedy_steps: int = typer.Option(8, help="Steps of greedy layer selection."),
    bm25: str = typer.Option("lucene", help="BM25 protocol: lucene (user turns, Unicode words) or thesis (the thesis's Okapi, first message, its sort and tie rules); thesis results go to sft-thesis (or pre-thesis)."),
    memory_budget_mb: int = typer.Option(1024, help="MiB of gradient slabs and score blocks held at once."),
    lake: Optional[str] = typer.Option(None, help="Lake URL."),
) -> None:
    """Select vs project: retrieval metrics per tensor, layer group, full gradient, projection and BM25."""
    from gradlake.flows.evaluate import evaluate
    from gradlake.tasks.evaluate.evaluation import EvaluationSpec, plan_evaluation
    from gradlake.tasks.common.model import ModelSpec

    try:
        spec = EvaluationSpec(model=ModelSpec(model=model, checkpoint=checkpoint), dataset=dataset, queries=query,
                              paradigm=paradigm, target=target, dense_baseline=dense_baseline, greedy_steps=greedy_steps, bm25=bm25,
                              memory_budget=memory_budget_mb << 20, lake=_lake(lake))
        plan_evaluation(spec)  # every group, the dataset and the lake's writability checked before Prefect starts
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)
    path = evaluate(spec)
    _print_headline(spec.lake, path)


@app.command()
def verify(
    lake: Optional[str] = typer.Option(None, help="Lake URL (default: $GRADLAKE_LAKE or ./demo-lake)."),
    repair: bool = typer.Option(False, help="Clear the completion flags of damaged chunks and score blocks; the next run recomputes exactly those."),
) -> None:
    """Check that every chunk the lake says is complete is there and unchanged; exit 1 if anything is damaged."""
    import pandas as pd

    from gradlake.lake.store import LakeStore
    from gradlake.lake.verify import verify_lake

    try:
        store = LakeStore(_lake(lake))
        store.check_exists()
        table = verify_lake(store, repair=repair, log=lambda line: typer.echo(line, err=True))
    except (ValueError, OSError) as err:
        _fail(err)
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        width = int(table["path"].str.len().max()) if len(table) else 0  # paths left-aligned: they are read, not compared
        typer.echo(table.to_string(index=False, formatters={"path": lambda p: p.ljust(width)}, justify="left")
                   if len(table) else f"nothing to verify in {store.url}")
    damaged = table[table["status"] == "damaged"]
    if len(damaged) and not damaged["repaired"].all():
        typer.secho(f"{len(damaged)} damaged; `gradlake verify --repair` clears what can be recomputed", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    if len(damaged):
        typer.echo(f"{len(damaged)} repaired: run the stages that wrote them again to recompute the cleared chunks")


@app.command()
def watch(
    model: list[str] = typer.Option([], "--model", "-m", help="Hub repository id, or a directory / s3:// prefix whose subdirectories are checkpoints; repeatable."),
    pattern: str = typer.Option(".*", help="Regular expression a checkpoint name must match in full, e.g. 'step\\d+'."),
    marker: Optional[str] = typer.Option(None, help="File a trainer writes last into a finished checkpoint."),
    dtype: str = typer.Option("float32", help="Dtype each checkpoint is loaded in: float32, bfloat16, float16."),
    variant: list[str] = typer.Option([], "--variant", "-v", help="Variants to extract (default: original, paraphrased); repeatable."),
    settings: str = typer.Option("{}", help="Further pipeline settings as JSON, e.g. '{\"shard_size\": 32, \"layers\": [\"*.mlp.*\"]}'."),
    interval: float = typer.Option(900, help="Seconds between two looks at the checkpoints."),
    off: bool = typer.Option(False, "--off", help="Turn the watcher's schedule off (parameters unchanged)."),
    lake: Optional[str] = typer.Option(None, help="Lake URL the pipeline writes to (s3://... or storage every worker shares)."),
) -> None:
    """Turn the checkpoint watcher on (or --off): validated parameters and an active schedule on the watch-checkpoints deployment."""
    import json

    from gradlake.flows.watch import WATCH_DEPLOYMENT, WatchSpec

    try:
        if off:
            spec = None
        else:
            if not model:
                raise ValueError("name at least one model to watch with --model")
            extra = json.loads(settings)
            if not isinstance(extra, dict):
                raise ValueError(f"--settings must be a JSON object of pipeline settings, not {settings!r}")
            pipeline = {**extra, **({"variants": variant} if variant else {})}
            spec = WatchSpec(models=[{"model": m, "pattern": pattern, "marker": marker, "dtype": dtype} for m in model],
                             pipeline=pipeline, lake=_lake(lake))
        if interval < 1:
            raise ValueError(f"--interval {interval:g} is too short; give seconds >= 1")
    except json.JSONDecodeError as err:
        _fail(ValueError(f"--settings {settings!r} is not JSON: {err}"))
    except (ValueError, ValidationError) as err:
        _fail(err)
    from gradlake.flows.watch import set_watch_schedule

    try:
        text = set_watch_schedule(spec, interval, WATCH_DEPLOYMENT)
    except LookupError as err:
        _fail(err)
    typer.echo(text)


def _spec_from(text: str, spec_class, what: str):
    """A validated spec from JSON text or @file.json (the same document as the deployment's `spec` parameter)."""
    import json
    from pathlib import Path

    try:
        if text.startswith("@"):
            path = Path(text[1:])
            if not path.is_file():
                raise ValueError(f"--spec {text!r}: no file {path}; give JSON text or @path/to/spec.json")
            text = path.read_text()
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError(f"--spec must be a JSON object of {what} settings, not {type(document).__name__}")
        return spec_class.model_validate(document)
    except json.JSONDecodeError as err:
        _fail(ValueError(f"--spec is not JSON ({err}); give JSON text or @path/to/spec.json"))
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)


SPEC_HELP = "Settings as JSON text or @file.json: the same document as the deployment's `spec` parameter."


@app.command("train")
def train_command(spec: str = typer.Option(..., "--spec", help=SPEC_HELP)) -> None:
    """Train a model on lake data (deterministic, resumable); checkpoints with lineage, answer quality per checkpoint."""
    from gradlake.flows.train import train_model
    from gradlake.tasks.training.train import TrainError, TrainSpec, plan_run

    validated = _spec_from(spec, TrainSpec, "training")
    try:
        plan_run(validated)  # every check before Prefect starts
    except (ValueError, TrainError, OSError) as err:
        _fail(err)
    for name in train_model(validated):
        typer.echo(name)


@app.command("influence")
def influence_command(spec: str = typer.Option(..., "--spec", help=SPEC_HELP)) -> None:
    """Kronfluence influence (identity, diagonal, kfac, ekfac) of training samples on queries, into the lake."""
    from gradlake.flows.influence import compute_influence_flow
    from gradlake.tasks.influence.compute import InfluenceSpec, plan_influence

    validated = _spec_from(spec, InfluenceSpec, "influence")
    try:
        plan_influence(validated)
    except (ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"{validated.lake}/{compute_influence_flow(validated)}")


@app.command("attribution")
def attribution_command(spec: str = typer.Option(..., "--spec", help=SPEC_HELP)) -> None:
    """The attribution benchmark: LDS, counterfactual removal and retrieval of every method's scores."""
    from gradlake.flows.attribution import evaluate_attribution, plan_attribution
    from gradlake.tasks.attribution.benchmark import AttributionSpec
    from gradlake.lake.store import LakeStore

    validated = _spec_from(spec, AttributionSpec, "attribution")
    try:
        plan_attribution.fn(validated)
    except (ValueError, OSError) as err:
        _fail(err)
    directory = evaluate_attribution(validated)
    _print_benchmark(LakeStore(validated.train.lake), validated.train.lake, directory, "attribution benchmark")


@app.command("protocol")
def protocol_command(spec: str = typer.Option(..., "--spec", help=SPEC_HELP + " E.g. @protocols/kronfluence-gpt2-wikitext2.json."),
                     plan: bool = typer.Option(False, "--plan", help="Only create the datasets and print the cost estimate.")) -> None:
    """A published attribution protocol end to end: datasets, training, influence and the benchmark against retraining."""
    from gradlake.flows.protocol import ProtocolSpec, describe_cost, run_protocol
    from gradlake.lake.store import LakeStore

    validated = _spec_from(spec, ProtocolSpec, "protocol")
    if plan:
        from gradlake.flows.dataset import create_dataset
        from gradlake.flows.protocol import protocol_cost

        for dataset in validated.datasets:
            create_dataset(dataset)
        try:
            typer.echo(f"protocol {validated.name}: {describe_cost(protocol_cost(validated))}")
        except (ValueError, OSError) as err:
            _fail(err)
        return
    result = run_protocol(validated)
    typer.echo(f"protocol {validated.name}: {describe_cost(result['cost'])}")
    _print_benchmark(LakeStore(validated.lake), validated.lake, result["benchmark"], f"protocol {validated.name}")


@app.command("trace")
def trace_command(
    base: str = typer.Option(..., help="Base model: Hugging Face id, local directory or preset."),
    candidate: str = typer.Option(..., help="Candidate model, of the same architecture and size."),
    base_checkpoint: Optional[str] = typer.Option(None, help="The base's revision or checkpoint subdirectory."),
    candidate_checkpoint: Optional[str] = typer.Option(None, help="The candidate's revision or checkpoint subdirectory."),
    statistic: list[str] = typer.Option(["cos", "emb", "mode"], "--statistic", "-s", help="cos, emb or mode; repeatable."),
    permute: bool = typer.Option(False, help="Permute the candidate first (a function-preserving control)."),
    permute_seed: int = typer.Option(0, help="Seed of that permutation."),
    align: bool = typer.Option(True, help="Also align the candidate to the base and report every statistic aligned."),
    mode_attention: bool = typer.Option(True, help="Attention weights move along the interpolation path."),
    mode_embeddings: bool = typer.Option(True, help="Embeddings move along the interpolation path."),
    dataset: str = typer.Option("probe", help="Dataset in the lake for the losses and perplexities."),
    variant: str = typer.Option("original", help="Its variant."),
    samples: int = typer.Option(64, help="The first this many samples."),
    max_length: int = typer.Option(1024, help="Tokens per sample at most."),
    points: int = typer.Option(11, help="Points on the interpolation path, end points included (2 or more)."),
    permutations: int = typer.Option(100, help="Permutations per permutation test (the smallest p-value is 1/(n+1))."),
    dtype: str = typer.Option("float32", help="Dtype both models are loaded in: float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    lake: Optional[str] = typer.Option(None, help="Lake URL."),
) -> None:
    """Is the candidate derived from the base?  Weight and embedding similarity with p-values, mode connectivity, perplexity."""
    import pandas as pd

    from gradlake.flows.trace import trace_models
    from gradlake.lake import open_lake
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.tracing.trace import TraceSpec, plan_trace

    try:
        spec = TraceSpec(base=ModelSpec(model=base, checkpoint=base_checkpoint, dtype=dtype, device=device),
                         candidate=ModelSpec(model=candidate, checkpoint=candidate_checkpoint, dtype=dtype, device=device),
                         statistics=statistic, permute=permute, permute_seed=permute_seed, align=align,
                         mode_attention=mode_attention, mode_embeddings=mode_embeddings, dataset=dataset, variant=variant,
                         n_samples=samples, max_length=max_length, points=points, permutations=permutations,
                         lake=_lake(lake))
        plan_trace(spec)  # both configs, shapes and the dataset checked before Prefect starts
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)
    directory = trace_models(spec)
    opened = open_lake(spec.lake)
    import json
    meta = json.loads(opened.store.fs.cat_file(opened.store.path(f"{directory}/meta.json")))
    typer.echo(f"{meta['verdict']}\nresults: {spec.lake}/{directory} (report.md, plots/loss_path.png)")
    table = opened.tracing(base=base, candidate=candidate, base_checkpoint=base_checkpoint,
                           candidate_checkpoint=candidate_checkpoint)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        typer.echo(table.to_string(index=False))


def main() -> None:
    # The ephemeral server's start-up telemetry write can collide with a concurrent run's
    # on the shared SQLite file; gradlake has no use for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # That temporary server starts in about 25 s on a busy two-core machine, past Prefect's 20 s default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Without PREFECT_API_URL, Prefect starts a temporary server that a killed CLI would leave running.
    from gradlake.flows.console import hide_told_tracebacks
    from gradlake.flows.temporary_server import end_with_this_process

    end_with_this_process()
    hide_told_tracebacks()  # each such error ends the command in its own `error:` line
    try:
        app()
    except Exception as err:
        # A service that does not answer fails deep inside Prefect or botocore; say which, in one line.
        problem = _explain(err)
        if problem is None:
            raise
        typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
