"""Leases on row-chunks, so that workers of runs with the same settings never compute one chunk together.

A lease is a claim (`lake.claims`) per group and row-chunk (`layout.lease_claim`) with an expiry:
taken before a chunk is computed, renewed while the work goes on, released once the chunk is
flagged complete.  A worker that dies leaves its leases to run out; then another takes them over.
"""

from __future__ import annotations

import time

from gradlake.lake import claims, layout
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.store import LakeStore

LEASE_SECONDS = 600.0  # a chunk lease: renewed while its worker computes; a dead worker's runs out


class ChunkLeases:
    """One worker's leases on row-chunks, over any number of groups."""

    def __init__(self, seconds: float = LEASE_SECONDS, owner: str | None = None):
        self.seconds = seconds
        self.owner = owner or claims.new_owner()
        self.held: dict[tuple[str, int], LakeStore] = {}
        self._renewed = time.monotonic()

    @staticmethod
    def key(group: GradientGroup, index: int) -> str:
        return layout.lease_claim(group.path, index)

    def take(self, group: GradientGroup, chunks: list[int]) -> list[int]:
        """The chunks among `chunks` now leased to us and still not complete (others are another worker's)."""
        taken = [k for k in chunks if claims.take(group.store, self.key(group, k), self.owner, self.seconds)]
        if not taken:
            return []
        # Flags read after the lease: a chunk finished meanwhile is not redone.
        pending = set(group.pending_chunks(group.plan.chunk_bounds(min(taken))[0], group.plan.chunk_bounds(max(taken))[1]))
        for k in [k for k in taken if k not in pending]:
            self.release(group, k)
        mine = [k for k in taken if k in pending]
        self.held.update({(group.path, k): group.store for k in mine})
        return mine

    def renew(self) -> None:
        """Push our leases further into the future; cheap to call often (it acts every quarter lease)."""
        if time.monotonic() - self._renewed < self.seconds / 4:
            return
        self._renewed = time.monotonic()
        for (path, k), store in list(self.held.items()):  # a copy: the writer thread releases chunks meanwhile
            claims.renew(store, layout.lease_claim(path, k), self.owner, self.seconds)

    def release(self, group: GradientGroup, index: int) -> None:
        self.held.pop((group.path, index), None)
        claims.release(group.store, self.key(group, index))

    def release_all(self) -> None:
        for (path, k), store in list(self.held.items()):
            claims.release(store, layout.lease_claim(path, k))
        self.held.clear()


def live(claim: claims.Claim | None) -> bool:
    """True when a claim is held by a process that may still be working: not expired, not known dead."""
    return claim is not None and not claim.expired and not claims.died_here(claim.about)


def leased_chunks(store: LakeStore, path: str) -> set[int]:
    """The row-chunks of the group at `path` that a live worker holds a lease on right now (work in progress)."""
    held = set()
    for found in store.glob(layout.claim_file(layout.lease_claim(path, "*"))):
        name = found.rsplit("/", 1)[-1][:-len(".json")]
        if name.isdigit() and live(claims.read_claim(store, layout.lease_claim(path, int(name)))):
            held.add(int(name))
    return held


def lease_held(store: LakeStore, path: str, index: int) -> bool:
    """True while a live worker holds the lease on row-chunk `index` of the group at `path`."""
    return live(claims.read_claim(store, layout.lease_claim(path, index)))


def lease_for_repair(store: LakeStore, path: str, index: int, owner: str) -> bool:
    """Lease row-chunk `index` for a repair (a short lease); False while a live worker holds it."""
    return claims.take(store, layout.lease_claim(path, index), owner, 60.0, {"repair": True})


def release_repair(store: LakeStore, path: str, index: int) -> None:
    """Give back a lease taken by `lease_for_repair`."""
    claims.release(store, layout.lease_claim(path, index))
