"""The verify flow: check every group the lake says is complete, and optionally clear what is damaged."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from gradlake.lake.store import public_url
from gradlake.tasks.common.render import markdown_table
from gradlake.tasks.common.verify import LakeDamaged, VerifySpec, verify_task


@flow(name="verify-lake", log_prints=True)
def verify(spec: VerifySpec) -> dict:
    """Verify a lake; the table goes to a Prefect artifact, and the run fails if anything is damaged."""
    table = verify_task(spec)
    counts = table["status"].value_counts().to_dict()
    create_markdown_artifact(markdown_table(table), key="lake-verification",
                             description=f"verification of {public_url(spec.lake)}")
    damaged = table[(table["status"] == "damaged") & ~table["repaired"]]
    if len(damaged):
        raise LakeDamaged(f"{len(damaged)} damaged in {public_url(spec.lake)}: {', '.join(damaged['path'][:5])}"
                          + (" and more" if len(damaged) > 5 else "") + "; run with repair to clear what can be recomputed")
    return counts
