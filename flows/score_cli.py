"""`gradlake score`: the command of the score-topk flow, its options made from `ScoreSpec` (registered by `flows.cli`)."""

from __future__ import annotations

import typer

from gradlake.flows.commands import spec_command
from gradlake.flows.flags import bytes_flag


def add_score_command(app: typer.Typer) -> None:
    """Register `gradlake score` on `app`."""

    @spec_command(app, "score", "gradlake.tasks.evaluate.scoring:ScoreSpec", names={"queries": ["-q"]},
                  parsers={"memory_budget": ("BYTES|<n>MiB|<n>GiB", bytes_flag)})
    def score(spec) -> None:
        """Each query's top-k rows of a lake group, streamed (no full score matrix); --rows-per-run fans out over a work pool."""
        from pydantic import ValidationError

        from gradlake.flows.console import fail
        from gradlake.flows.score import score_topk
        from gradlake.lake.store import LakeStore
        from gradlake.tasks.evaluate.scoring import open_groups, read_scores

        try:
            open_groups(spec)  # both groups complete and comparable, checked before Prefect starts
        except (ValueError, ValidationError, OSError) as err:
            fail(err)
        directory = score_topk(spec)
        table = read_scores(LakeStore(spec.lake), directory)
        typer.echo(table[table["query"] < 3].to_string(index=False))
        typer.echo(f"top-{spec.k} of {table['query'].nunique()} queries: {spec.lake}/{directory} (table {len(table)} rows)")
