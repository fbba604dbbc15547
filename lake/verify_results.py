"""Verifying everything in a lake that is a directory of files rather than a Zarr group or a dataset.

`result_findings` walks, in this order:

- every result (`lake.results`: evaluations, attribution benchmarks in today's and the earlier
  layout, tracing results): its ``meta.json`` is read, and every file is checked against its
  ``manifest.json``; a result written before manifests has its ``meta.json`` and Parquet tables
  read, and is "unchecked" where they read (nothing proves they are as written);
- every ground-truth losses directory (``<ground truth>/<lds or cf set>/losses/``, both layouts):
  the files its manifest lists are checked, any other Parquet file in it is read ("unchecked");
- every answer-quality result (``quality/…``: ``answers.parquet`` and ``summary.json``) and training
  curve (``evaluations/<model>/training/<dataset>``): checked against its manifest, read where it
  has none;
- every set of Kronfluence's factors: checked against its manifest and the digests its ``factors.json``
  records, and a file neither lists is named (added after they were written); factors written before
  either are "unchecked";
- every other directory holding a ``manifest.json`` (training checkpoints written into the lake,
  trace-many's summaries): checked against it;
- the ``zarr.json`` of the lake's root and of every group above the gradient and score groups
  (a JSON object naming a group), and every entry of the paraphrase cache (a JSON object holding
  its text, whose sha256 is its file name, and a paraphrase; a damaged entry is asked again).

A result directory whose run was stopped after its manifest and before its ``meta.json`` is not a
result; it is reported as damaged (run the stage again), unless a live run holds its write claim,
when it is being written now and is left alone.  Nothing here repairs: a damaged result or file is
written again by running the stage that made it (ground-truth losses are recomputed by the next
benchmark, which warns as it does).
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import pyarrow.parquet as pq

from gradlake.lake import layout
from gradlake.lake.claims import died_here, read_claim
from gradlake.lake.manifest import MANIFEST, check_directory, entry_problem, file_entry, listing_problems, read_manifest
from gradlake.lake.results import META, read_result_meta
from gradlake.lake.store import DamagedMetadata, LakeError, LakeStore, public_url, read_json, scan_json

# Every kind of result, by the catalog's kind; benchmarks in today's layout and earlier lakes'.
RESULTS = (("evaluation", layout.EVALUATIONS), ("attribution", layout.BENCHMARKS),
           ("attribution", layout.LEGACY_BENCHMARKS), ("tracing", layout.TRACING))
# The ground truth's losses directories: <ground truth>/<lds-… or cf-…>/losses, in both layouts.
GROUND_TRUTH_LOSSES = tuple(f"{truth}/*/losses" for truth in (layout.ground_truth_dir("*", "*", "*", "*"),
                                                                layout.legacy_ground_truth_dir("*", "*", "*", "*")))
# Directories of files with a fixed name in them that do not count as results: (kind, pattern of a file of each).
FILE_SETS = (("quality", f"{layout.QUALITY}/summary.json"),
             ("training curve", f"{layout.training_curve_dir('*', '*')}/curve.parquet"),
             ("factors", f"{layout.influence_factors_dir('*', '*', '*', '*', '*', '*')}/factors.json"))
OLDER = "written before manifests: read, not proven"

Finding = tuple[str, str, str, list[str]]  # (kind, directory relative to the lake, ok | damaged | unchecked, problems)


def _relative(store: LakeStore, path: str) -> str:
    return path[len(store.root) + 1:]


def _public(store: LakeStore, problems: list[str]) -> list[str]:
    """Problems naming files by the lake's public URL (check_directory names them by filesystem path)."""
    return [p.replace(store.root, public_url(store.url)) for p in problems]


def _parquet_problems(store: LakeStore, directory: str, skip: set[str] = frozenset()) -> list[str]:
    """One line per Parquet or JSON file directly in `directory` (less `skip`) that cannot be read whole."""
    problems = []
    for path in store.glob(f"{directory}/*.parquet") + store.glob(f"{directory}/*.json"):
        name = posixpath.basename(path)
        if name in skip or name == MANIFEST:
            continue
        try:
            if name.endswith(".json"):
                json.loads(store.fs.cat_file(path))
            else:
                with store.fs.open(path, "rb") as handle:
                    pq.read_table(handle)
        except Exception as err:  # pyarrow's ArrowInvalid ("magic bytes not found"), JSONDecodeError and their kin
            problems.append(f"{public_url(store.url)}/{directory}/{name} cannot be read as "
                            f"{'JSON' if name.endswith('.json') else 'Parquet'} ({type(err).__name__}: {str(err)[:80]})")
    return problems


def _being_written(store: LakeStore, directory: str) -> bool:
    """True while a live run holds the claim on writing the result at `directory` (lake.results)."""
    held = read_claim(store, f"write/{directory}")
    return held is not None and not held.expired and not died_here(held.about)


def check_result(store: LakeStore, kind: str, directory: str) -> Finding:
    """Verify one result directory (it holds a meta.json or a manifest.json)."""
    try:
        files = read_manifest(store.fs, store.path(directory))
    except LakeError as err:
        return kind, directory, "damaged", _public(store, [str(err)])
    if not store.fs.exists(store.path(f"{directory}/{META}")):
        if _being_written(store, directory):
            return kind, directory, "unchecked", ["being written by a live run now"]
        return kind, directory, "damaged", [f"{public_url(store.url)}/{directory} has a {MANIFEST} and no {META}: its "
                                            "run stopped before the end; run the stage that writes it again"]
    problems = []
    try:
        read_result_meta(store, directory)
    except LakeError as err:
        problems.append(str(err))
    if files is not None:
        problems += [p for p in _public(store, check_directory(store.fs, store.path(directory)))
                     if f"/{META} " not in p or not problems]  # a damaged meta.json is named once
        return kind, directory, "damaged" if problems else "ok", problems
    problems += _parquet_problems(store, directory)
    return kind, directory, "damaged" if problems else "unchecked", problems or [OLDER]


def check_files(store: LakeStore, kind: str, directory: str) -> Finding:
    """Verify a directory of files that is not a result (ground-truth losses, factors, a checkpoint, a summary):
    the files its manifest lists are checked, and any Parquet file it does not list is read."""
    try:
        files = read_manifest(store.fs, store.path(directory))
    except LakeError as err:
        files, problems = {}, _public(store, [str(err)])
    else:
        problems = _public(store, check_directory(store.fs, store.path(directory), required=False))
    problems += _parquet_problems(store, directory, skip=set(files or {}))
    unlisted = {posixpath.basename(p) for p in store.glob(f"{directory}/*.parquet")} - set(files or {})
    if problems:
        return kind, directory, "damaged", problems
    if unlisted or files is None:
        return kind, directory, "unchecked", [f"{', '.join(sorted(unlisted)) or 'its files'}: {OLDER}"]
    return kind, directory, "ok", []


def check_factors(store: LakeStore, kind: str, directory: str) -> Finding:
    """Verify a set of influence factors: as `check_files`, then each file against the digest ``factors.json``
    records (they outlive a removed manifest), and any file that neither lists (added after they were written)."""
    kind, directory, status, problems = check_files(store, kind, directory)
    notes, problems = (problems, []) if status == "unchecked" else ([], problems)
    try:
        record = json.loads(store.fs.cat_file(store.path(f"{directory}/factors.json")))
        manifest = read_manifest(store.fs, store.path(directory))
    except (FileNotFoundError, ValueError, LakeError):  # named by check_files
        return kind, directory, status, notes + problems
    digests = record.get("digests") if isinstance(record, dict) else None
    if not isinstance(digests, dict):
        digests = {}  # written before factors.json recorded digests: the manifest's, if any, are checked
    elif manifest is None:
        problems.append(f"{public_url(store.url)}/{directory}/{MANIFEST} is missing (it is written last: the copy of "
                        "these factors into the lake stopped before its end, or it was removed)")
    named = {problem.split(" ", 1)[0] for problem in problems}
    for name, recorded in digests.items():
        path = store.path(f"{directory}/{name}")
        if (manifest or {}).get(name) == recorded or path.replace(store.root, public_url(store.url)) in named:
            continue  # checked against the manifest already
        try:
            problem = entry_problem(path, file_entry(store.fs, path), recorded)
        except FileNotFoundError:
            problem = f"{path} is missing"
        problems += _public(store, [problem] if problem else [])
    if digests or manifest is not None:
        listing = listing_problems(store.fs, store.path(directory), {**digests, **(manifest or {})},
                                  others=(MANIFEST, "factors.json"))
        problems += _public(store, [p for p in listing if " was added after " in p])
    if not problems:
        return kind, directory, status, notes
    problems[0] += (f"; remove {public_url(store.url)}/{directory}: the next `gradlake influence` fits these factors "
                    "again")
    return kind, directory, "damaged", problems


def _manifest_kind(directory: str) -> str:
    if directory.startswith("influence/"):
        return "factors"
    if directory.startswith("quality/"):
        return "quality"
    return "checkpoint" if posixpath.basename(directory).startswith("checkpoint") else "files"


def result_findings(store: LakeStore, log=print) -> list[Finding]:
    """(kind, directory, status, problems) for every result, ground-truth losses directory and other directory
    with a manifest in the lake; status is ok, damaged or unchecked (see the module's docstring)."""
    targets: dict[str, tuple] = {}
    for kind, pattern in RESULTS:
        for name in (META, MANIFEST):
            for path in store.glob(f"{pattern}/{name}"):
                targets.setdefault(posixpath.dirname(_relative(store, path)), (check_result, kind))
    for kind, pattern in (*(("ground truth", p) for p in GROUND_TRUTH_LOSSES),
                          ("tracing summary", f"{layout.TRACING_BASES}/summary.parquet")):
        for path in store.glob(pattern):
            directory = _relative(store, path).removesuffix("/summary.parquet")
            targets.setdefault(directory, (check_files, kind))
    for kind, pattern in FILE_SETS:
        for path in store.glob(pattern):
            targets.setdefault(posixpath.dirname(_relative(store, path)),
                               (check_factors if kind == "factors" else check_files, kind))
    for path in store.glob(f"**/{MANIFEST}"):  # factors, checkpoints in a lake prefix, anything else with a manifest
        directory = posixpath.dirname(_relative(store, path))
        if not directory.startswith(".gradlake") and directory not in targets:
            kind = _manifest_kind(directory)
            targets[directory] = (check_factors if kind == "factors" else check_files, kind)
    findings = []
    for i, (directory, (check, *kind)) in enumerate(sorted(targets.items()), 1):
        finding = check(store, *kind, directory)
        findings.append(finding)
        log(f"[{i}/{len(targets)}] {finding[2]:9s} {directory}" + (f": {finding[3][0]}" if finding[2] == "damaged" else ""))
    for finding in [*hierarchy_findings(store), *cache_findings(store)]:  # logged when damaged: there are many
        findings.append(finding)
        if finding[2] == "damaged":
            log(f"[-] damaged   {finding[1]}: {finding[3][0]}")
    return findings


def hierarchy_findings(store: LakeStore) -> list[Finding]:
    """The ``zarr.json`` of the lake's root and of every group above a gradient or score group (Zarr writes one per
    level on the way down): each must be a JSON object naming a group; and each ground truth's ``subsets.json``."""
    levels = {"/".join(pattern.split("/")[:depth]) for pattern in (layout.GRADIENT_GROUPS, layout.SCORE_GROUPS)
              for depth in range(1, pattern.count("/") + 1)}
    findings = []
    for level in ["", *sorted(levels)]:
        for path in store.glob(f"{level}/zarr.json" if level else "zarr.json"):
            relative = _relative(store, path)
            try:
                record = read_json(store, relative)
                node = (record or {}).get("node_type")
                problems = [] if node == "group" else [f"{public_url(store.url)}/{relative} is not a group's metadata "
                                                       f"(node_type {node!r}); write it again as {{\"zarr_format\": 3, "
                                                       '"node_type": "group", "attributes": {}}']
            except DamagedMetadata as err:
                problems = [str(err)]
            findings.append(("group metadata", relative, "damaged" if problems else "ok", problems))
    for pattern in GROUND_TRUTH_LOSSES:  # the record of an LDS set's subsets beside its losses (rewritten by each run)
        for directory, _, damage in scan_json(store, f"{pattern.removesuffix('/losses')}/subsets.json"):
            findings.append(("ground truth", f"{directory}/subsets.json", "damaged" if damage else "ok",
                             [damage] if damage else []))
    return findings


# -- the paraphrase cache: <lake>/cache/paraphrase/<settings key>/<text key>.json, one answer each

def text_key(text: str) -> str:
    """The file name (less ``.json``) of a text's entry in the paraphrase cache: the sha256 of the text."""
    return hashlib.sha256(text.encode()).hexdigest()


def cached_paraphrase(raw: bytes, key: str) -> str:
    """The paraphrase held by a cache entry named `key`; ValueError saying why the entry is damaged otherwise."""
    try:
        entry = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"it is not valid JSON ({str(err)[:60]})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or text_key(entry["text"]) != key:
        raise ValueError("it does not hold the text its name is the sha256 of")
    paraphrase = entry.get("paraphrase")
    if not isinstance(paraphrase, str) or not paraphrase.strip():
        raise ValueError("it holds no paraphrase")
    return paraphrase


def cache_findings(store: LakeStore) -> list[Finding]:
    """One finding per settings directory of the paraphrase cache, naming each entry that is damaged (a rerun of the
    paraphrasing asks for those again)."""
    findings = []
    for directory in sorted(_relative(store, p) for p in store.glob(f"{layout.PARAPHRASE_CACHE}/*")):
        paths = store.glob(f"{directory}/*.json")
        found = store.fs.cat(paths, on_error="return") if paths else {}
        problems = []
        for path in sorted(found):
            try:
                if isinstance(found[path], Exception):
                    raise ValueError(f"it cannot be read ({type(found[path]).__name__})")
                cached_paraphrase(found[path], posixpath.basename(path).removesuffix(".json"))
            except ValueError as err:
                problems.append(f"{public_url(store.url)}/{_relative(store, path)} is damaged: {err}; remove it, and "
                                "the next paraphrasing asks for it again")
        findings.append(("paraphrase cache", directory, "damaged" if problems else "ok", problems))
    return findings


__all__ = ["RESULTS", "GROUND_TRUTH_LOSSES", "FILE_SETS", "result_findings", "check_result", "check_files", "check_factors",
           "hierarchy_findings", "text_key", "cached_paraphrase", "cache_findings"]
