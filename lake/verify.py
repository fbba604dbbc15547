"""Is what the lake says complete really there and unchanged?  `verify_lake` walks it and says.

For every gradient and projection group it checks the metadata against the group's plan (array
shapes, dtypes, chunk shapes; a group directory whose zarr.json is gone is named too), its token
arrays (``sample``, ``input_ids``, ``label_mask``, ``n_tokens``) against the digests recorded when it
was created, its completion flags object by object, then reads every row-chunk flagged complete: a chunk object whose
CRC32C does not match (Zarr's crc32c codec), a chunk object that is missing (it reads as NaN, the
fill value of checked groups) and a row-chunk whose values differ from the digest recorded when it
was written (a chunk swapped or rewritten) are each found and named.  Score groups are read
block by block the same way (a missing block reads as NaN; scores are always finite).  Datasets are
checked against their content hash; every other directory gradlake writes (results, ground-truth
losses, influence factors, training checkpoints in the lake) against its digest manifest
(`lake.verify_results`).  Groups written
before checksums existed can only be read, not proven; they are reported as "unchecked" for what
cannot be proven.

Verify runs safely beside an extraction: a row-chunk a live worker holds a lease on (`lake.leases`)
is "in progress", never judged; a chunk that looks damaged is judged again once (another process
may be rewriting it), and repair takes the chunk's lease before it touches its flag.

`repair=True` clears the completion flags of exactly the damaged chunks and blocks, so the next
run of the stage that wrote them recomputes those and nothing else; a damaged flag object over a
chunk whose values still prove their digest is rewritten as complete.  Damaged metadata cannot be
repaired by flags: those groups are named, with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import zarr

from gradlake.lake import claims, layout
from gradlake.lake.datasets import content_hash, dataset_meta, read_dataset
from gradlake.lake.gradient_plan import ATTR
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import damaged_chunk, digest
from gradlake.lake.leases import lease_for_repair, lease_held, leased_chunks, release_repair
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import DamagedMetadata, LakeStore, public_url, scan_json
from gradlake.lake.verify_results import result_findings

@dataclass
class Finding:
    """What verifying one group (or dataset version) found."""

    kind: str
    path: str
    status: str = "ok"  # ok | damaged | unchecked
    problems: list[str] = field(default_factory=list)
    chunks: list = field(default_factory=list)  # damaged row-chunks (gradients) or (query, train) blocks (scores)
    in_progress: list = field(default_factory=list)  # row-chunks a live worker holds: not judged
    proven: list = field(default_factory=list)  # row-chunks whose flag object is damaged but whose values check
    repairable: bool = True
    repaired: bool = False

    def damage(self, problem: str, chunk=None, repairable: bool = True) -> None:
        self.status = "damaged"
        self.problems.append(problem)
        if chunk is not None and chunk not in self.chunks:
            self.chunks.append(chunk)
        self.repairable = self.repairable and repairable

    def row(self) -> dict:
        return {"kind": self.kind, "path": self.path, "status": self.status,
                "damaged_chunks": len(self.chunks), "repaired": self.repaired,
                "problem": "; ".join(self.problems[:3]) + (f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else "")}


def _read(array: zarr.Array, selection, label: str) -> tuple[np.ndarray | None, str | None]:
    """Values at `selection`, or None and a one-line reason (which chunk object is damaged) if they cannot be read."""
    try:
        return np.asarray(array[selection]), None
    except Exception as err:
        rows = selection[0] if isinstance(selection, tuple) else selection
        rows = rows if isinstance(rows, slice) else slice(rows, rows + 1)
        return None, f"{label}: {damaged_chunk(array, rows, err)}"


def verify_gradient_group(store: LakeStore, path: str, repair: bool = False) -> Finding:
    """Check one gradient (or projection) group; with `repair`, clear the flags of its damaged chunks.

    Every array is covered: the token arrays against the digests recorded when the group was made, the
    completion flags object by object, each flagged row-chunk's values against its digest.  A chunk a
    live worker holds a lease on is work in progress: never judged, never cleared."""
    finding = Finding("projection" if "-proj-" in path.rsplit("/", 1)[-1] else "gradients", path)
    try:
        group = GradientGroup.open(store, path)
    except DamagedMetadata as err:
        finding.damage(str(err), repairable=False)
        return finding
    plan = group.plan
    for problem in group.metadata_problems():
        finding.damage(problem, repairable=False)
    if finding.status == "damaged":
        return finding
    for problem in group.token_problems():
        finding.damage(problem, repairable=False)
    leased = leased_chunks(store, path)  # before the flags: a chunk flagged after this was leased until then
    flags, unknown = _flags(group, finding)
    for k in sorted(set(np.flatnonzero(flags).tolist()) | set(unknown)):
        problem = _chunk_problem(group, k)
        if problem and k not in unknown:  # judged once more: a chunk another process rewrites or clears right now
            if k in leased or lease_held(store, path, k) or not _flag(group, k):
                finding.in_progress.append(k)
                continue
            problem = _chunk_problem(group, k)
        if k in leased and k in unknown:
            finding.in_progress.append(k)
        elif problem:
            finding.damage(problem, k)
        elif k in unknown:
            finding.proven.append(k)  # its flag object is damaged, its values are what was written
    if plan.mode != "store" and flags.all() and finding.status == "ok" and group.meta_complete():
        for name in plan.parameters:  # the mean must be what its chunks' sums give
            mean, problem = _read(group.group[name], slice(None), f"array {name!r}")
            if problem or not np.array_equal(mean, group.mean_of_sums(name), equal_nan=True):
                finding.damage(problem or f"array {name!r}: the stored mean differs from its chunks' sums "
                               "(it is recomputed from them)", "mean")
    if finding.status == "ok" and not plan.checksum:
        finding.status = "unchecked"
        finding.problems.append("written before checksums: chunks were read, not proven")
    if repair and finding.status == "damaged" and finding.repairable:
        _repair(store, group, finding)
    if finding.in_progress and finding.status in ("ok", "unchecked"):
        finding.status = "in progress"
        finding.problems.insert(0, f"row-chunks {sorted(set(finding.in_progress))[:8]} are being written by a live "
                                "worker (leased): not judged")
    return finding


def _flag(group: GradientGroup, k: int) -> bool:
    """Row-chunk `k`'s completion flag as it is now (False where it cannot be read)."""
    try:
        return bool(group.group["shard_complete"][k])
    except Exception:
        return False


def _flags(group: GradientGroup, finding: Finding) -> tuple[np.ndarray, list[int]]:
    """The completion flags, and the row-chunks whose flag object cannot be trusted (each named in `finding`): one
    that cannot be read, or one that reads 0 (a missing object does) in a group marked complete."""
    try:
        flags, unknown = group.done_chunks(), []
    except Exception:
        array = group.group["shard_complete"]
        flags, unknown = np.zeros(group.plan.n_chunks, dtype=bool), []
        for k in range(group.plan.n_chunks):  # one object per flag: find which
            try:
                flags[k] = bool(array[k])
            except Exception as err:
                unknown.append(k)
                start, stop = group.plan.chunk_bounds(k)
                finding.damage(f"completion flag of row-chunk {k} (samples {start}-{stop - 1}): "
                               f"{damaged_chunk(array, slice(k, k + 1), err)}", k)
    if group.meta_complete():
        for k in np.flatnonzero(~flags).tolist():
            if k not in unknown:
                unknown.append(k)
                start, stop = group.plan.chunk_bounds(k)
                finding.damage(f"completion flag of row-chunk {k} (samples {start}-{stop - 1}): object "
                               f"shard_complete/c/{k} is missing or says 0 while the group is marked complete", k)
    return flags, unknown


def _chunk_problem(group: GradientGroup, k: int) -> str | None:
    """What is wrong with row-chunk `k` (its values unreadable, missing, or not what its digest says), or None."""
    plan = group.plan
    start, stop = plan.chunk_bounds(k)
    label = f"row-chunk {k} (samples {start}-{stop - 1})"
    selection = slice(start, stop) if plan.mode == "store" else k
    values = []
    for name in plan.data_arrays():
        value, problem = _read(group.group[name], selection, f"{label}, array {name!r}")
        if problem:
            return problem
        values.append(value)
    if not plan.checksum:
        return None
    if any(np.isnan(v).all() for v in values if v.size):
        return f"{label}: a chunk object is missing (it reads as the fill value)"
    recorded, problem = _read(group.group["chunk_digest"], k, f"{label}, its digest")
    if problem:
        return problem
    if digest(values, group.digest_algorithm) != int(recorded):
        return f"{label}: its values differ from the digest recorded when it was written"
    return None


def _repair(store: LakeStore, group: GradientGroup, finding: Finding) -> None:
    """Clear the flags of the damaged row-chunks, rewrite the damaged flags of proven ones; each under a lease,
    so that a chunk a worker has started meanwhile is left to it."""
    owner = claims.new_owner()
    for k in dict.fromkeys([k for k in finding.chunks if k != "mean"] + finding.proven):
        if not lease_for_repair(store, group.path, k, owner):
            finding.in_progress.append(k)
            continue
        try:  # judged once more under the lease: a run may have rewritten it since
            if _chunk_problem(group, k) is None:
                if k in finding.proven:
                    group.group["shard_complete"][k] = 1  # its damaged flag object rewritten
            else:
                group.clear([k])
        finally:
            release_repair(store, group.path, k)
    if "mean" in finding.chunks:
        group.clear([])
    finding.repaired = True


def headless_groups(store: LakeStore, pattern: str, listed: set[str]) -> list[Finding]:
    """Group directories matching `pattern` that hold objects but no zarr.json (their group metadata deleted)."""
    findings = []
    for found in store.glob(pattern):
        path = found[len(store.root) + 1:]
        if path in listed or not store.fs.isdir(found):
            continue
        held = len(store.fs.find(found))
        if held:
            findings.append(Finding("gradients", path, repairable=False))
            findings[-1].damage(f"its group metadata {path}/zarr.json is missing while {held} objects remain; remove "
                                "the directory and run the extraction again", repairable=False)
    return findings


def verify_score_group(store: LakeStore, path: str, repair: bool = False) -> Finding:
    """Check one score group: its id arrays read, and every block flagged complete can be read and is finite.

    A damaged flag object is named; with `repair` the flags are rewritten from what is proven (blocks
    that read whole and finite stay complete, the others are cleared)."""
    finding = Finding("scores", path)
    try:
        scores = ScoreGroup.open(store, path)
    except DamagedMetadata as err:
        finding.damage(str(err), repairable=False)
        return finding
    except Exception as err:
        finding.damage(f"cannot be opened ({type(err).__name__}: {err})", repairable=False)
        return finding
    for name in ("query", "train"):
        _, problem = _read(scores.group[name], slice(None), f"array {name!r}")
        if problem:
            finding.damage(f"{problem}; run the attribution again into a new group", repairable=False)
    array = scores.group["block_complete"]
    flags, unknown = _score_flags(array, bool(scores.meta.get("complete")), finding)
    for qb, tb in np.argwhere(flags == 1).tolist():
        qs, ts = scores.bounds(qb, tb)
        label = f"block ({qb}, {tb}) (queries {qs.start}-{qs.stop - 1}, training samples {ts.start}-{ts.stop - 1})"
        values, problem = _read(scores.group["scores"], (qs, ts), label)
        if problem:
            finding.damage(problem, (qb, tb))
        elif not np.isfinite(values).all():
            finding.damage(f"{label}: holds NaN (a missing chunk object reads as NaN; scores are always finite)", (qb, tb))
    if repair and finding.status == "damaged" and finding.repairable:
        damaged = [b for b in finding.chunks if isinstance(b, tuple)]
        for qb, tb in damaged:
            flags[qb, tb] = 0
        for region in unknown:  # each damaged flag object written whole: proven blocks 1, damaged ones 0
            array[region] = flags[region]
        scores.clear(damaged)
        finding.repaired = True
    return finding


def _score_flags(array: zarr.Array, complete: bool, finding: Finding) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """A score group's completion flags, and the regions of flag objects that cannot be trusted (each named in
    `finding`; their blocks are flagged 1 here, to be judged by what they hold): unreadable, holding other values than
    0 and 1, or a 0 in a group marked complete (a missing object reads as 0).

    New groups hold one flag per object, with a CRC32C; older ones all flags in one object without a checksum."""
    flags = np.zeros(array.shape, dtype=np.uint8)
    unknown = []
    try:  # every object at once (concurrent requests); object by object only where one cannot be read
        whole = np.asarray(array[:])
    except Exception:
        whole = None
    grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks)]
    for key in [(i, j) for i in grid[0] for j in grid[1]]:
        region = tuple(slice(k * c, min(n, (k + 1) * c)) for k, c, n in zip(key, array.chunks, array.shape))
        name = f"object block_complete/c/{key[0]}/{key[1]}"
        try:
            values = whole[region] if whole is not None else np.asarray(array.get_block_selection(key))
            problem = (f"{name} holds values other than 0 and 1" if not np.isin(values, (0, 1)).all() else
                       f"{name} is missing or says a block is not written, while the group is marked complete"
                       if complete and not values.all() else None)
        except Exception as err:
            what = "its checksum does not match" if "checksum" in str(err).lower() else f"{type(err).__name__}: {err}"
            problem = f"{name} is damaged ({what})"
        if problem:
            finding.damage(f"completion flags: {problem}; its blocks are judged by what they hold", "flags")
            flags[region] = 1
            unknown.append(region)
        else:
            flags[region] = values
    return flags, unknown


def verify_dataset(store: LakeStore, directory: str, repair: bool = False) -> Finding:
    """Check one dataset version: its meta is readable and its data hash to what the meta says."""
    finding = Finding("dataset", directory, repairable=False)
    _, name, variant, version = directory.split("/")
    try:
        meta = dataset_meta(store, name, variant, version)
    except DamagedMetadata as err:
        finding.damage(str(err), repairable=False)
        return finding
    except Exception as err:
        finding.damage(f"meta.json cannot be read ({type(err).__name__}: {err})", repairable=False)
        return finding
    try:
        frame = read_dataset(store, name, variant, version)
    except Exception as err:  # pyarrow's "magic bytes not found" and its kin
        finding.damage(f"{public_url(store.url)}/{directory}/data.parquet cannot be read ({type(err).__name__}: "
                       f"{str(err)[:80]}); write the dataset again", repairable=False)
        return finding
    if content_hash(frame) != meta.get("content_hash"):
        finding.damage(f"data.parquet does not hash to {meta.get('content_hash')}: it changed after it was written",
                       repairable=False)
    return finding


def verify_lake(store: LakeStore, repair: bool = False, log=print) -> pd.DataFrame:
    """Check everything in the lake; one row per group or dataset version (status ok, damaged or unchecked)."""
    findings: list[Finding] = []
    targets = []
    for kind, pattern, check in (("gradients", layout.GRADIENT_GROUPS, verify_gradient_group),
                                 ("scores", layout.SCORE_GROUPS, verify_score_group)):
        listed = set()
        for path, record, damage in scan_json(store, f"{pattern}/zarr.json"):
            listed.add(path)
            if damage is not None:
                finding = Finding(kind, path, repairable=False)
                finding.damage(damage, repairable=False)
                findings.append(finding)
            elif ATTR in (record or {}).get("attributes", {}):
                targets.append((check, path))
        if kind == "gradients":
            findings += headless_groups(store, pattern, listed)
    for directory, _, damage in scan_json(store, f"{layout.DATASET_VERSIONS}/meta.json"):
        targets.append((verify_dataset, directory))
    for directory, _, damage in scan_json(store, f"{layout.DATASET_VARIANTS}/latest.json"):
        if damage is not None:
            findings.append(Finding("dataset", directory, repairable=False))
            findings[-1].damage(damage, repairable=False)
    for i, (check, path) in enumerate(targets, 1):
        finding = check(store, path, repair=repair)
        findings.append(finding)
        log(f"[{i}/{len(targets)}] {finding.status:9s} {path}" + (f": {finding.problems[0]}" if finding.status == "damaged" else ""))
    for kind, directory, status, problems in result_findings(store, log=log):  # results, factors, checkpoints, ...
        findings.append(Finding(kind, directory, status, list(problems), repairable=False))
    columns = ["kind", "path", "status", "damaged_chunks", "repaired", "problem"]
    return pd.DataFrame([f.row() for f in findings], columns=columns).sort_values(["status", "kind", "path"],
                                                                                     ignore_index=True)


__all__ = ["Finding", "verify_lake", "verify_gradient_group", "headless_groups", "verify_score_group", "verify_dataset"]
