"""The verify flow: check every group the lake says is complete, and optionally clear what is damaged."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake.store import LakeError, LakeStore, default_lake, public_url
from gradlake.lake.verify import verify_lake
from gradlake.tasks.evaluate.report import markdown_table


class VerifySpec(BaseModel):
    """Which lake to verify, and whether to clear the flags of what is damaged."""

    model_config = ConfigDict(extra="forbid")

    lake: str = Field(default_factory=default_lake, description="Lake URL: file:///path, a directory, or s3://bucket/prefix.")
    repair: bool = Field(default=False, description="Clear the completion flags of damaged chunks and score blocks, so that the next run of the stage that wrote them recomputes exactly those.")


class LakeDamaged(LakeError):
    """Verification found damage (the flow fails, so the UI shows it red)."""


@task(name="verify-lake", cache_policy=NONE)
def verify_task(spec: VerifySpec):
    store = LakeStore(spec.lake)
    store.check_exists()
    return verify_lake(store, repair=spec.repair, log=get_run_logger().info)


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
