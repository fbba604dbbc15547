"""The `gradlake` command: each subcommand starts a flow with named, validated parameters (its spec's, `flows/commands.py`)."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from pydantic import ValidationError

from gradlake.flows.commands import spec_command
from gradlake.flows.console import explain, fail, print_benchmark, print_headline, training_losses
from gradlake.flows.flags import bytes_flag, factors_flag, model_at_flag, projection_flag
from gradlake.flows.score_cli import add_score_command


app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, context_settings={"max_content_width": 120},
                  help="gradlake: per-sample gradients of language models in a Zarr lake.")
dataset_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Probe datasets in the lake.")
app.add_typer(dataset_app, name="dataset")
add_score_command(app)  # flows/score_cli.py: `gradlake score`
LAKE_HELP = "Lake URL (default: $GRADLAKE_LAKE or ./demo-lake)."


def _version(shown: bool) -> None:
    if shown:
        from gradlake.tasks.common.lineage import gradlake_version

        typer.echo(f"gradlake {gradlake_version()}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print gradlake's version and exit.")) -> None:
    """gradlake: per-sample gradients of language models in a Zarr lake."""


def _lake(lake: Optional[str]) -> str:
    from gradlake.lake.store import default_lake

    return lake or default_lake()


def _demo_settings():
    from gradlake.flows.demo import DemoSettings

    return DemoSettings


def _default_lake() -> str:
    return _lake(None)


@spec_command(app, "extract", "gradlake.tasks.gradients.plan:ExtractionSpec",
              names={"layers": ["-l"], "projections": ["--project", "-p"]},
              parsers={"projections": ("KIND:SCOPE:DIM[:SEED]|kronecker:KOUTxKIN[:SEED]", projection_flag)})
def extract(spec) -> None:
    """Extract per-sample gradients into the lake (the extract-gradients flow)."""
    from gradlake.flows.extract import extract_gradients
    from gradlake.flows.temporary_server import served_by, start_temporary_server
    from gradlake.tasks.gradients.plan import plan_extraction

    server = start_temporary_server()  # comes up while the inputs are checked; stopped at once should they be bad
    try:
        plan_extraction(spec)  # every input checked here, before any write
    except (ValueError, ValidationError, OSError) as err:
        fail(err)
    with served_by(server):
        state = extract_gradients(spec, return_state=True)
    if state.is_failed():  # what only the weights can show (NaN or Inf gradients) ends in one line too
        fail(state.result(raise_on_failure=False))
    typer.echo(f"gradients: {spec.lake}/{state.result()}")


@dataset_app.command("probe")
def dataset_probe(lake: Optional[str] = typer.Option(None, help=LAKE_HELP)) -> None:
    """Store the bundled probe set (variants original, paraphrased) as dataset 'probe'."""
    from gradlake.tasks.data.probes import store_probe_set

    try:
        variants = store_probe_set(_lake(lake))
    except (ValueError, OSError) as err:
        fail(err)
    typer.echo(f"dataset 'probe' ({', '.join(variants)}) stored in {_lake(lake)}")


@spec_command(app, "project", "gradlake.tasks.projection.stored:ProjectSpec",
              parsers={"projection.factors": ("KOUTxKIN", factors_flag)})
def project(spec) -> None:
    """Project stored per-sample gradients (the project-gradients flow)."""
    from gradlake.flows.project import project_gradients
    from gradlake.tasks.projection.stored import create_projection_group

    try:
        create_projection_group(spec)  # checks every setting against the stored group before any work
    except (ValueError, ValidationError, OSError) as err:
        fail(err)
    state = project_gradients(spec, return_state=True)
    if state.is_failed():
        fail(state.result(raise_on_failure=False))
    typer.echo(f"projections: {spec.lake}/{state.result()}")


@spec_command(dataset_app, "create", "gradlake.tasks.data.dataset:DatasetSpec",
              names={"paraphrase.base_url": ["--base-url"], "paraphrase.temperature": ["--temperature"],
                     "paraphrase.max_concurrency": ["--max-concurrency"], "paraphrase.api_key_env": ["--api-key-env"],
                     "paraphrase.api_key_block": ["--api-key-block"]},
              parsers={"generate": ("MODEL[@CHECKPOINT]", model_at_flag)})
def dataset_create(spec) -> None:
    """Create a probe set in the lake: original, paraphrased, model-generated (the create-dataset flow)."""
    from gradlake.flows.dataset import create_dataset
    from gradlake.tasks.data.dataset import check_dataset_spec
    from gradlake.tasks.data.sources import load_source

    try:
        check_dataset_spec(spec)
        load_source(spec.source)  # the source read and checked here, before Prefect starts: a bad file is one line
    except (ValueError, ValidationError, OSError) as err:
        fail(err)
    state = create_dataset(spec, return_state=True)
    if state.is_failed():
        fail(state.result(raise_on_failure=False))
    for variant, version in state.result().items():
        typer.echo(f"{spec.name}/{variant}: version {version}")

@app.command()
def catalog(lake: Optional[str] = typer.Option(None, help=LAKE_HELP)) -> None:
    """List everything in a lake."""
    import pandas as pd

    from gradlake.lake import open_lake

    try:
        opened = open_lake(_lake(lake))
        frame = opened.catalog()
    except (ValueError, OSError) as err:
        fail(err)
    if frame.empty:
        typer.echo(f"lake {opened.url} is empty: no dataset, gradient group or evaluation yet")
        return
    with pd.option_context("display.width", 250, "display.max_columns", 16, "display.max_colwidth", 40):
        typer.echo(frame[["kind", "model", "checkpoint", "dataset", "variant", "paradigm", "target", "mode", "extraction",
                          "layers", "holds", "projection", "n_samples", "chunks_done", "chunks_total",
                          "complete"]].to_string(index=False))
    damaged = frame[frame["damaged"].notna()]
    for _, row in damaged.iterrows():  # listed above as incomplete; the reason in full, one line each
        typer.secho(f"damaged: {row['path']}: {row['damaged']}", fg=typer.colors.RED, err=True)
    if len(damaged):
        typer.secho("`gradlake verify` checks every chunk too", err=True)


@spec_command(app, "demo", "gradlake.flows.demo:DemoSettings", names={"n_subsets": ("--subsets",), "retrain_seeds": ("--seeds",)},
              presets={"full": lambda: _demo_settings().powered()})
def demo(settings,
         lake: Optional[str] = typer.Option(None, help=LAKE_HELP),
         full: bool = typer.Option(False, "--full", help="The powered benchmark: 64 training samples, 40 subsets x 3 seeds, "
                                                         "48 queries per set (about 45 minutes on two cores); other options "
                                                         "still win.")) -> None:
    """Offline: train a tiny OLMo-2 on part of the probe set, then compare every attribution method on it against
    retraining, on held-out queries and on paraphrases."""
    import pandas as pd

    from gradlake.flows.console import log_to_file
    from gradlake.flows.demo import demo_log, demo_pipeline
    from gradlake.lake import open_lake
    from gradlake.lake.store import LakeStore, normalize_url
    from gradlake.tasks.training.report import read_training_curve

    url = normalize_url(_lake(lake))
    log = demo_log(url)
    typer.echo(f"demo: one line per stage here (about 6 minutes on two cores at the default sizes); the whole log: {log}")
    with log_to_file(log):
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
    losses = training_losses(run["output"])
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        shown = quality[["checkpoint", "rouge_l", "bleu_corpus"]].assign(
            train_loss=[losses.get(c, float("nan")) for c in quality["checkpoint"]])
        typer.echo(shown.to_string(index=False))
    print_headline(url, result["selection"])
    final = result["benchmarks"][max(result["benchmarks"])]
    for label, title in (("held_out", "held-out queries (never trained on)"),
                         ("paraphrased", "paraphrases of training samples (fact tracing)")):
        print_benchmark(store, url, final[label], f"attribution benchmark of the final checkpoint, {title}")
    curve = read_training_curve(store, result["curve"])
    typer.echo("")
    typer.echo(f"across training, held-out LDS ({url}/{result['curve']}/curve.png):")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        keep = ["step"] + [c for c in curve if c.startswith("top1 ")] + [
            c for c in ("lds influence-ekfac", "lds grad-dot", "lds bm25", "lds random") if c in curve]
        typer.echo(curve[keep].to_string(index=False, na_rep=""))
    typer.echo("read it with: python -c \"from gradlake.lake import open_lake; print(open_lake('%s').catalog())\"" % url)
    typer.echo("or open notebooks/explore_lake.ipynb")
    typer.echo(f"the whole log: {log}")


@spec_command(app, "evaluate", "gradlake.tasks.evaluate.spec:EvaluationSpec",
              names={"queries": ["--query", "-q"]}, parsers={"memory_budget": ("BYTES|<n>MiB|<n>GiB", bytes_flag)})
def evaluate_command(spec) -> None:
    """Select vs project: retrieval metrics per tensor, layer group, full gradient, projection and BM25."""
    from gradlake.flows.evaluate import evaluate
    from gradlake.tasks.evaluate.evaluation import plan_evaluation

    try:
        plan_evaluation(spec)  # every group, the dataset and the lake's writability checked before Prefect starts
    except (ValueError, ValidationError, OSError) as err:
        fail(err)
    state = evaluate(spec, return_state=True)
    if state.is_failed():  # damage found while reading (a chunk, a digest) ends in its own one line
        fail(state.result(raise_on_failure=False))
    print_headline(spec.lake, state.result())

@spec_command(app, "verify", "gradlake.tasks.common.verify:VerifySpec")
def verify(spec) -> None:
    """Check that every chunk the lake says is complete is there and unchanged; exit 1 if anything is damaged."""
    import pandas as pd

    from gradlake.lake.store import LakeStore
    from gradlake.lake.verify import verify_lake

    try:
        store = LakeStore(spec.lake)
        store.check_exists()
        table = verify_lake(store, repair=spec.repair, log=lambda line: typer.echo(line, err=True))
    except (ValueError, OSError) as err:
        fail(err)
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        width = int(table["path"].str.len().max()) if len(table) else 0  # paths left-aligned: they are read, not compared
        typer.echo(table.to_string(index=False, formatters={"path": lambda p: p.ljust(width)}, justify="left")
                   if len(table) else f"nothing to verify in {store.url}")
    if len(table):  # the verdict last, where the eye lands after a long table
        counts = table["status"].value_counts()
        typer.echo(f"{len(table)} checked: " + ", ".join(f"{counts[s]} {s}" for s in ("ok", "in progress", "unchecked",
                                                                                       "damaged") if s in counts))
    damaged = table[table["status"] == "damaged"]
    if len(damaged) and not damaged["repaired"].all():
        typer.secho(f"{len(damaged)} damaged; `gradlake verify --repair` clears what can be recomputed", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    if len(damaged):
        typer.echo(f"{len(damaged)} repaired: run the stages that wrote them again to recompute the cleared chunks")


@spec_command(app, "watch", "gradlake.flows.watch:WatchSpec", each={"models": "model"},
              names={"models.model": ["-m"], "pipeline.variants": ["--variant", "-v"]},
              parsers={"pipeline.projections": ("KIND:SCOPE:DIM[:SEED]|kronecker:KOUTxKIN[:SEED]", projection_flag),
                       "pipeline.create.generate": ("MODEL[@CHECKPOINT]", model_at_flag)},
              fallbacks={"lake": _default_lake}, unless="off")
def watch(spec, interval: float = typer.Option(900, metavar="SECONDS", help="Seconds between two looks at the checkpoints."),
          off: bool = typer.Option(False, "--off", help="Turn the watcher's schedule off (parameters unchanged).")) -> None:
    """Turn the checkpoint watcher on (or --off): validated parameters and an active schedule on the watch-checkpoints deployment."""
    from gradlake.flows.watch_schedule import WATCH_DEPLOYMENT, set_watch_schedule  # --off imports no stage

    if interval < 1:
        fail(ValueError(f"--interval {interval:g} is too short; give seconds >= 1"))
    if spec is not None:
        from gradlake.flows.watch import awaited_directory, check_watched

        for watched in spec.models:  # started before training: the directory may come later, its parent must be there
            try:
                note = awaited_directory(watched)
                check_watched(spec, watched)
            except ValueError as err:
                fail(err)
            except OSError as err:  # e.g. no credentials for the bucket here; the workers may have them
                note = f"could not look at {watched.model} from here ({explain(err) or err}); each tick looks from its worker"
            if note:
                typer.echo(note)
    try:
        text = set_watch_schedule(spec, interval, WATCH_DEPLOYMENT)
    except LookupError as err:
        fail(err)
    typer.echo(text)


@spec_command(app, "pipeline", "gradlake.flows.pipeline:PipelineSpec",
              parsers={"projections": ("KIND:SCOPE:DIM[:SEED]|kronecker:KOUTxKIN[:SEED]", projection_flag),
                       "create.generate": ("MODEL[@CHECKPOINT]", model_at_flag)},
              fallbacks={"lake": _default_lake})
def pipeline_command(spec) -> None:
    """One model and checkpoint through dataset, extraction, projections and evaluation (the gradlake-pipeline flow).

    It runs here; its shards go to the extract-shards deployment's GPU workers unless --shard-deployment none."""
    from gradlake.flows.pipeline import pipeline, require_dataset
    from gradlake.tasks.gradients.plan import plan_extraction

    try:
        if spec.create is None:  # a dataset the pipeline creates is checked when it exists
            require_dataset(spec)  # a missing dataset is told how to make it, not only that it is missing
            for variant in spec.variants:
                plan_extraction(spec.extraction(variant), device_here=not spec.shard_deployment)
    except (ValueError, ValidationError, OSError) as err:
        fail(err)
    if spec.shard_deployment:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(spec.shard_deployment)
            except ObjectNotFound:
                fail(LookupError(f"the Prefect server has no deployment {spec.shard_deployment!r} to send the shards to; "
                                  "deploy deployments/prefect.yaml (and start a worker on its pool), or extract here with "
                                  "--shard-deployment none"))
    state = pipeline(spec, return_state=True)
    if state.is_failed():
        fail(state.result(raise_on_failure=False))
    for path in state.result():
        typer.echo(f"{spec.lake}/{path}")


@spec_command(app, "train", "gradlake.tasks.training.spec:TrainSpec", fallbacks={"lake": _default_lake})
def train_command(spec) -> None:
    """Train a model on lake data (deterministic, resumable); checkpoints with lineage, answer quality per checkpoint."""
    from gradlake.flows.train import train_model
    from gradlake.tasks.training.plan import plan_run
    from gradlake.tasks.training.spec import TrainError

    try:
        plan_run(spec)  # every check before Prefect starts
    except (ValueError, TrainError, OSError) as err:
        fail(err)
    state = train_model(spec, return_state=True)
    if state.is_failed():  # what only the run can find (a NaN loss, a damaged checkpoint, S3 gone) ends in one line too
        fail(state.result(raise_on_failure=False))
    for name in state.result():
        typer.echo(name)


@spec_command(app, "influence", "gradlake.tasks.influence.spec:InfluenceSpec", fallbacks={"lake": _default_lake})
def influence_command(spec) -> None:
    """Kronfluence influence (identity, diagonal, kfac, ekfac) of training samples on queries, into the lake."""
    from gradlake.flows.influence import compute_influence_flow
    from gradlake.lake.store import LakeError
    from gradlake.tasks.influence.compute import plan_influence

    try:
        plan_influence(spec)
    except (ValueError, OSError) as err:
        fail(err)
    try:
        path = compute_influence_flow(spec)
    except LakeError as err:  # damaged factors or score metadata in the lake: one line
        fail(err)
    typer.echo(f"{spec.lake}/{path}")


@spec_command(app, "attribution", "gradlake.tasks.attribution.spec:AttributionSpec", fallbacks={"train.lake": _default_lake})
def attribution_command(spec) -> None:
    """The attribution benchmark: LDS, counterfactual removal and retrieval of every method's scores."""
    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.lake.store import LakeStore
    from gradlake.tasks.attribution.benchmark import plan_benchmark

    try:
        plan_benchmark(spec)
    except (ValueError, OSError) as err:
        fail(err)
    directory = evaluate_attribution(spec)
    print_benchmark(LakeStore(spec.train.lake), spec.train.lake, directory, "attribution benchmark")


@spec_command(app, "protocol", "gradlake.tasks.attribution.protocol:ProtocolSpec", fallbacks={"lake": _default_lake})
def protocol_command(spec, plan: bool = typer.Option(False, "--plan", help="Only create the datasets and print the cost estimate.")) -> None:
    """A published attribution protocol end to end: datasets, training, influence and the benchmark against retraining.

    E.g. --spec @protocols/kronfluence-gpt2-wikitext2.json (its `lake` fills every stage's)."""
    from gradlake.flows.protocol import run_protocol
    from gradlake.lake.store import LakeStore
    from gradlake.tasks.attribution.protocol import describe_cost

    if plan:
        from gradlake.flows.dataset import create_dataset
        from gradlake.tasks.attribution.protocol import protocol_cost

        for dataset in spec.datasets:
            create_dataset(dataset)
        try:
            typer.echo(f"protocol {spec.name}: {describe_cost(protocol_cost(spec))}")
        except (ValueError, OSError) as err:
            fail(err)
        return
    result = run_protocol(spec)
    typer.echo(f"protocol {spec.name}: {describe_cost(result['cost'])}")
    print_benchmark(LakeStore(spec.lake), spec.lake, result["benchmark"], f"protocol {spec.name}")


@spec_command(app, "trace", "gradlake.tasks.tracing.trace:TraceSpec",
              names={"base.model": ["--base"], "candidate.model": ["--candidate"], "n_samples": ["--samples"],
                     "statistics": ["--statistic", "-s"]},
              fallbacks={"lake": _default_lake})
def trace_command(spec) -> None:
    """Is the candidate derived from the base?  Weight and embedding similarity with p-values, mode connectivity, perplexity."""
    import pandas as pd

    from gradlake.flows.trace import trace_models
    from gradlake.lake import open_lake
    from gradlake.lake.results import read_result_meta, read_result_table
    from gradlake.tasks.tracing.trace import plan_trace

    try:
        plan_trace(spec)  # both configs, shapes and the dataset checked before Prefect starts
    except (ValueError, ValidationError, OSError) as err:
        fail(err)
    directory = trace_models(spec)
    opened = open_lake(spec.lake)
    meta = read_result_meta(opened.store, directory)
    typer.echo(f"{meta['verdict']}\nresults: {spec.lake}/{directory} (report.html)")
    # This run's own table: a control (…-permuted-s<seed>) lies beside the real result and is never read for it.
    table = read_result_table(opened.store, directory, "results", what="tracing result")
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        typer.echo(table.to_string(index=False))


def main() -> None:
    from gradlake.flows.api_check import prepare_api
    from gradlake.flows.console import hide_told_tracebacks, told
    from gradlake.flows.deferred import defer_iri_grammar

    defer_iri_grammar()  # before anything imports Prefect (and with it jsonschema)
    prepare_api(sys.argv[1:])  # a temporary server's settings, or the given server checked before any work
    hide_told_tracebacks()  # each such error ends the command in its own `error:` line
    try:
        app()
    except Exception as err:
        # A service that does not answer fails deep inside Prefect or botocore; say which, in one line.
        problem = explain(err)
        if problem is None and told(err):  # bad input that only the run could find, raised out of its flow
            problem = str(err)
        if problem is None:
            raise
        typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
