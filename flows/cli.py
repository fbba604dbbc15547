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
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _lake(lake: Optional[str]) -> str:
    from tasks.extract import default_lake

    return lake or default_lake()


@app.command()
def extract(
    model: str = typer.Option(..., help="Hugging Face id, local directory, or preset (amd-olmo-1b-sft, olmo-2-7b-sft)."),
    checkpoint: Optional[str] = typer.Option(None, help="Hub revision or checkpoint subdirectory."),
    dataset: str = typer.Option("probe", help="Dataset name in the lake."),
    variant: str = typer.Option("original", help="Dataset variant."),
    paradigm: str = typer.Option("sft", help="sft (assistant tokens) or pre (all tokens)."),
    layers: list[str] = typer.Option([], "--layers", "-l", help="Glob over parameter names; repeat for several. None: all."),
    mode: str = typer.Option("store", help="store, mean or mean_normalized."),
    shard_size: int = typer.Option(64, help="Samples per shard."),
    batch_size: int = typer.Option(8, help="Samples per backward pass (divides shard size)."),
    max_length: int = typer.Option(1024, help="Tokens per sample at most."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16."),
    store_dtype: str = typer.Option("float32", help="Stored gradient dtype: float32 or float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own code."),
    lake: Optional[str] = typer.Option(None, help="Lake URL (default: $GRADLAKE_LAKE or ./demo-lake)."),
) -> None:
    """Extract per-sample gradients into the lake (the extract-gradients flow)."""
    from flows.extract import extract_gradients
    from tasks.extract import ExtractionSpec, plan_extraction
    from tasks.model import ModelSpec

    try:
        spec = ExtractionSpec(
            model=ModelSpec(model=model, checkpoint=checkpoint, dtype=dtype, device=device, trust_remote_code=trust_remote_code),
            dataset=dataset, variant=variant, paradigm=paradigm, layers=layers, mode=mode, shard_size=shard_size,
            batch_size=batch_size, max_length=max_length, store_dtype=store_dtype, lake=_lake(lake),
        )
        plan_extraction(spec)  # every input checked here, before Prefect starts and before any write
    except (ValueError, ValidationError, OSError) as err:
        _fail(err)
    path = extract_gradients(spec)
    typer.echo(f"gradients: {spec.lake}/{path}")


@dataset_app.command("probe")
def dataset_probe(lake: Optional[str] = typer.Option(None, help="Lake URL.")) -> None:
    """Store the bundled probe set (variants original, paraphrased) as dataset 'probe'."""
    from tasks.probes import store_probe_set

    try:
        variants = store_probe_set(_lake(lake))
    except (ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"dataset 'probe' ({', '.join(variants)}) stored in {_lake(lake)}")


@app.command()
def catalog(lake: Optional[str] = typer.Option(None, help="Lake URL.")) -> None:
    """List everything in a lake."""
    import pandas as pd

    from lake import open_lake

    frame = open_lake(_lake(lake)).catalog()
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.max_colwidth", 40):
        typer.echo(frame[["kind", "model", "checkpoint", "dataset", "variant", "paradigm", "mode", "n_samples",
                          "shards_done", "shards_total", "complete"]].to_string(index=False))


@app.command()
def demo(lake: Optional[str] = typer.Option(None, help="Lake URL (default: $GRADLAKE_LAKE or ./demo-lake).")) -> None:
    """Run the whole pipeline offline on tiny models and the bundled probe set."""
    from flows.demo import demo_pipeline
    from lake import open_lake
    from lake.store import normalize_url

    url = normalize_url(_lake(lake))
    demo_pipeline(url)
    frame = open_lake(url).catalog()
    grads = frame[frame["kind"] == "gradients"]
    typer.echo("")
    typer.echo(f"lake: {url}")
    typer.echo(f"  {len(frame[frame['kind'] == 'dataset'])} dataset variants, {len(grads)} gradient groups "
               f"({int(grads['complete'].sum())} complete), {int(grads['numel'].max())} gradient values per sample at most")
    for row in grads.itertuples():
        typer.echo(f"  {row.path}  [{row.n_samples} samples x {int(row.n_parameters)} tensors, "
                   f"{'complete' if row.complete else 'incomplete'}]")
    typer.echo("read it with: python -c \"from lake import open_lake; print(open_lake('%s').catalog())\"" % url)


def main() -> None:
    # The ephemeral server's start-up telemetry write can collide with a concurrent run's
    # on the shared SQLite file; gradlake has no use for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
