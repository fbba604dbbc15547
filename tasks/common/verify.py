"""Verifying a lake: every object read back against its digest, damage named, completion flags of damaged parts cleared on request."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake.store import LakeError, LakeStore, default_lake
from gradlake.lake.verify import verify_lake


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
