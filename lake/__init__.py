"""The object-store lake: URLs, the Zarr layout, the catalog and the analyst API."""

from gradlake.lake.catalog import Lake, open_lake
from gradlake.lake.store import LakeError, LakeStore

__all__ = ["Lake", "LakeError", "LakeStore", "open_lake"]
