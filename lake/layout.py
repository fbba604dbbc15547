"""The lake's on-disk layout: every path and chunk shape is decided here and only here.

```
<lake>/
  datasets/<dataset>/<variant>/<version>/data.parquet   probe sets (one row per sample)
  datasets/<dataset>/<variant>/<version>/meta.json      their lineage and content hash
  datasets/<dataset>/<variant>/latest.json              the newest version's meta
  gradients/<model>/<checkpoint>/<dataset>/<variant>/<stem>-<mode>[-<settings>]/
                                                    one Zarr v3 group per extraction (its name: below)
  gradients/<model>/<checkpoint>/<dataset>/<variant>/<stem>[-store-<settings>]-proj-<projection>/
                                                    one per projection of an extraction's gradients
  quality/<model>/<checkpoint>/<dataset>/<variant>/  a checkpoint's answers scored (answers.parquet, summary.json)
  evaluations/<model>/<checkpoint>/<dataset>/<stem>[-<settings>][-thesis]/   select vs project (lake.evaluations)
  evaluations/<model>/training/<dataset>/            the demo's top-1 and LDS per training step
  cache/paraphrase/<settings>/<text key>.json       paid-for paraphrases
  influence/<model>/<checkpoint>/<dataset>/<paradigm>-<strategy>-<key>/factors/   Kronfluence's factors
  attribution/<model>/<checkpoint>/<train dataset>/
      <query dataset>.<query variant>/<method>/     a score group (Zarr v3; the '.' marks it)
      benchmarks/<queries>/                         the attribution benchmark (a result: lake.results)
      groundtruth/<queries>/lds-<key>/, cf-<key>/   retrained models' query losses
  tracing/<base>/<checkpoint>/<candidate>/<checkpoint>/   one model-tracing result (a result)
  tracing/<base>/<checkpoint>/<candidate>/<checkpoint>-permuted-s<seed>/  its control (candidate permuted first)
  tracing/<base>/<checkpoint>/summary.parquet, summary.md every candidate traced against the base
  .gradlake/create/<group path>.json                a group's creation claim (lake.claims)
  .gradlake/leases/<group path>/<row-chunk>.json    a row-chunk's lease (lake.leases)
```

Lakes written before the attribution stage kept its results under one prefix hold benchmarks at
``evaluations/<model>/<checkpoint>/<train dataset>/attribution/<queries>/`` and ground truth at
``groundtruth/<model>/<checkpoint>/<train dataset>/<queries>/``: the ``legacy_*`` functions name
them, and ``lake.locations`` picks whichever a given lake holds.  ``benchmarks`` and
``groundtruth`` have no '.', so no score-group pattern (``SCORE_GROUPS``) ever matches them.

The stem is the paradigm for weight gradients, and ``<paradigm>-<target>`` for the other
extraction targets (``sft-inputs_embeds``, ``sft-inputs_embeds_mean``), so that a target's
groups, projections and evaluations never meet another's.

One variant holds several extractions side by side: their settings decide the group's name
(``extraction_settings``).  The settings that name a group are the tensors it selects and how they
are stored: the layer patterns and the stored dtype.  With the defaults (every parameter,
float32) the name is ``<stem>-<mode>``, as in every lake before names carried settings; otherwise
``<stem>-<mode>-<settings>``, the settings that differ from the defaults, in this order, joined by
'-': ``L`` and 8 hex digits of the SHA-256 of the layer patterns (as given, in order, joined by
newlines), then the dtype (``bfloat16``, ``float16``): e.g. ``sft-store-L1f0c9a2b``,
``sft-store-L1f0c9a2b-bfloat16``.  The rest does not name a group: the tokens (dataset version,
chat template, labels, max_length) and whether the gradients were kept (``keep_gradients`` off
stores the same extraction's projections alone, so they equal those made from kept gradients,
fingerprint and all); an extraction that differs from the group of its name only in them is
refused, naming what differs.  Two rules keep older lakes:
a group at ``<stem>-<mode>`` holding exactly the asked extraction (made before names carried
settings) is that extraction's group wherever its settings would name it; and where such an
older group with other settings holds ``<stem>-<mode>``, an extraction with the default settings
goes to ``<stem>-<mode>-default``.  Readers never parse a name: they pick a group by the
settings in its attrs (``lake.extractions``).  A projection group is named after its gradient
group: ``<stem>-proj-<projection>`` beside ``<stem>-store``, ``<group>-proj-<projection>`` beside
a named one (``sft-store-L1f0c9a2b-proj-rademacher-flat-d512-s0``); an evaluation's directory is
``<stem>``, ``<stem>-<settings>`` for a named extraction, then ``-thesis`` for the thesis's BM25.

The glob patterns ``GRADIENT_GROUPS`` (and ``model_gradient_groups``), ``SCORE_GROUPS``,
``BENCHMARKS``, ``LEGACY_BENCHMARKS``, ``EVALUATIONS``, ``TRACING``, ``TRACING_BASES``,
``DATASET_VARIANTS``, ``DATASET_VERSIONS`` and ``QUALITY`` match, relative to the lake, the
directories of one kind; a lister appends the file that marks one (``zarr.json`` for a Zarr
group, ``meta.json`` for a result).

See ``docs/lake.md`` for the arrays inside a gradient group.
"""

from __future__ import annotations

import hashlib
import math
import re

CHUNK_BYTES = 16 << 20  # one chunk is at most this size: large enough for S3, small enough for RAM


def key(text: str) -> str:
    """A path-safe key for a model id, path or checkpoint name ('amd/AMD-OLMo-1B-SFT' -> 'amd--AMD-OLMo-1B-SFT')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", text.strip("/")).strip("-.")
    if not slug:
        raise ValueError(f"{text!r} gives an empty lake key")
    return slug


def model_key(model: str, local: bool) -> str:
    """A lake key for a model: hub ids keep their name, local paths add a short hash of the path."""
    if not local:
        return key(model)
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return f"{key(name)}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


NAME_RULE = "one path part: letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', '\\' or '..')"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def name_key(kind: str, value: str) -> str:
    """Validate a user-chosen name (dataset, variant, ...) that becomes one path part in the lake."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} is not a valid name; use {NAME_RULE}")
    return value


def relative_key(kind: str, value: str) -> str:
    """Validate a user-given path inside the lake (a group's path): relative, each part a name, so no '..'."""
    if not isinstance(value, str) or not all(re.fullmatch(r"\w[\w.-]*", part, re.ASCII) for part in value.split("/")):
        raise ValueError(f"{kind} {value!r} is not a path inside the lake; give it relative to the lake, as the catalog "
                         "lists it (names of letters, digits, '.', '_' or '-' joined by '/'; no leading '/', no '..')")
    return value


def name_fields(*fields: str, relative: bool = False):
    """A pydantic validator of spec fields that become lake path parts (a name, a list of them, or None), refusing
    '/', '..' or an absolute path in one line naming field, value and what is accepted, before any stage writes.

    Assigned in a spec's class body: ``_names = layout.name_fields("dataset", "variant")``; `relative`: the fields
    are paths inside the lake (:func:`relative_key`), not single names."""
    from pydantic import ValidationInfo, field_validator

    def names(cls, value, info: ValidationInfo):
        for name in value if isinstance(value, (list, tuple)) else [value]:
            if name is not None:
                (relative_key if relative else name_key)(info.field_name, name)
        return value

    return field_validator(*fields)(classmethod(names))


TARGETS = ("parameters", "inputs_embeds", "inputs_embeds_mean")


def stem(paradigm: str, target: str = "parameters") -> str:
    """The first part of a gradient group's name: the paradigm, and the target unless it is the weights."""
    if target not in TARGETS:
        raise ValueError(f"extraction target {target!r} is not one of {list(TARGETS)}")
    return paradigm if target == "parameters" else f"{paradigm}-{target}"


# ---------------------------------------------------------------- gradients and projections

GRADIENT_GROUPS = "gradients/*/*/*/*/*"  # every gradient and projection group
DEFAULT_DTYPE = "float32"
LEGACY_TAKEN = "default"  # the default settings' name where an older extraction holds <stem>-<mode>


def extraction_settings(layer_patterns: list[str] | tuple[str, ...], dtype: str = DEFAULT_DTYPE) -> str:
    """The settings part of a gradient group's name: '' for the defaults (every parameter, float32).

    ``L<8 hex of the layer patterns>`` and the stored dtype, those that are not the default, joined
    by '-' (see the module's docstring)."""
    parts = []
    if layer_patterns:
        text = "\n".join(layer_patterns)
        parts.append("L" + hashlib.sha256(text.encode()).hexdigest()[:8])
    if dtype != DEFAULT_DTYPE:
        parts.append(dtype)
    return "-".join(parts)


def gradient_group_name(paradigm: str, mode: str, target: str = "parameters", settings: str = "") -> str:
    """``<stem>-<mode>[-<settings>]``: the name of one extraction's group in its variant's directory."""
    return f"{stem(paradigm, target)}-{mode}" + (f"-{settings}" if settings else "")


def gradient_group_path(model: str, checkpoint: str, dataset: str, variant: str, paradigm: str, mode: str,
                        target: str = "parameters", settings: str = "") -> str:
    """``gradients/<model>/<checkpoint>/<dataset>/<variant>/<stem>-<mode>[-<settings>]``: one extraction's group."""
    return f"{gradients_dir(model, checkpoint, dataset, variant)}/{gradient_group_name(paradigm, mode, target, settings)}"


def projection_group_path(gradient_path: str, label: str) -> str:
    """A projection group: beside its gradient group, ``<stem>-proj-<label>`` of a ``<stem>-store`` group (as
    lakes always had it), ``<group>-proj-<label>`` of a named one (``sft-store-L1f0c9a2b-proj-<label>``)."""
    parent, leaf = gradient_path.rsplit("/", 1)
    return f"{parent}/{leaf.removesuffix('-store')}-proj-{label}"


def evaluation_name(stem_: str, settings: str = "", thesis: bool = False) -> str:
    """An evaluation directory's name: the stem, the settings of a named extraction, '-thesis' for its BM25."""
    return stem_ + (f"-{settings}" if settings else "") + ("-thesis" if thesis else "")


def gradients_dir(model: str, checkpoint: str | None = None, dataset: str | None = None,
                  variant: str | None = None) -> str:
    """``gradients/<model>[/<checkpoint>[/<dataset>[/<variant>]]]``: where a model's (checkpoint's, ...) groups lie."""
    given = [model, checkpoint, dataset, variant]
    while given and given[-1] is None:
        given.pop()
    if None in given:
        raise ValueError(f"gradients_dir takes its parts in order (model, checkpoint, dataset, variant); got {given}")
    return "/".join(["gradients", *given])


def model_gradient_groups(model: str) -> str:
    """The pattern of every gradient and projection group of one model (any checkpoint, dataset, variant)."""
    return f"{gradients_dir(model)}/*/*/*/*"


# ---------------------------------------------------------------- datasets and their quality

DATASET_VARIANTS = "datasets/*/*"  # each holds latest.json
DATASET_VERSIONS = "datasets/*/*/*"  # each holds data.parquet and meta.json
QUALITY = "quality/*/*/*/*"  # each holds answers.parquet and summary.json


def quality_dir(model: str, checkpoint: str, dataset: str, variant: str) -> str:
    return f"quality/{model}/{checkpoint}/{dataset}/{variant}"


def dataset_dir(dataset: str, variant: str) -> str:
    return f"datasets/{dataset}/{variant}"


def dataset_latest_file(dataset: str, variant: str) -> str:
    """The newest version's meta, written after the version itself."""
    return f"{dataset_dir(dataset, variant)}/latest.json"


def dataset_version(content_hash: str) -> str:
    """A version's name: 'v-' and 12 hex digits of its content hash."""
    return "v-" + content_hash.split(":", 1)[-1][:12]


def dataset_version_dir(dataset: str, variant: str, version: str) -> str:
    return f"{dataset_dir(dataset, variant)}/{version}"


def dataset_data_file(dataset: str, variant: str, version: str) -> str:
    return f"{dataset_version_dir(dataset, variant, version)}/data.parquet"


def dataset_meta_file(dataset: str, variant: str, version: str) -> str:
    return f"{dataset_version_dir(dataset, variant, version)}/meta.json"


def generated_variant(model: str, checkpoint: str) -> str:
    """The variant name of answers generated by a model at a checkpoint: they differ between them."""
    return f"model_generated.{model}.{checkpoint}"


PARAPHRASE_CACHE = "cache/paraphrase"


def paraphrase_cache_dir(settings: str) -> str:
    """``cache/paraphrase/<settings>``: one JSON answer per user text paraphrased with these settings."""
    return f"{PARAPHRASE_CACHE}/{settings}"


def paraphrase_cache_file(settings: str, text: str) -> str:
    """``cache/paraphrase/<settings>/<text>.json``: the answer for one user text (`text`: its key, a hash)."""
    return f"{paraphrase_cache_dir(settings)}/{text}.json"


# ---------------------------------------------------------------- evaluations

EVALUATIONS = "evaluations/*/*/*/*"  # select-vs-project results (a training curve's directory is one level up)


def evaluation_dir(model: str, checkpoint: str, dataset: str, paradigm: str) -> str:
    """``evaluations/<model>/<checkpoint>/<dataset>/<paradigm>``: a select-vs-project evaluation.

    `paradigm` is the directory's name (``evaluation_name``): the stem, the extraction's settings where they
    are not the defaults, and ``-thesis`` for the thesis's BM25 protocol."""
    return f"evaluations/{model}/{checkpoint}/{dataset}/{paradigm}"


def training_curve_dir(model: str, dataset: str) -> str:
    """``evaluations/<model>/training/<dataset>``: the demo's top-1 and LDS against the training step.

    Its files (``curve.parquet``, ``curve.png``) lie in it directly, never one level down where an
    evaluation of a checkpoint named ``training`` would be."""
    return f"evaluations/{model}/training/{dataset}"


# ---------------------------------------------------------------- influence and attribution

def influence_factors_dir(model: str, checkpoint: str, dataset: str, paradigm: str, strategy: str, key: str) -> str:
    """``influence/<model>/<checkpoint>/<dataset>/<paradigm>-<strategy>-<key>/factors``: Kronfluence's factors."""
    return f"influence/{model}/{checkpoint}/{dataset}/{paradigm}-{strategy}-{key}/factors"


def attribution_dir(model: str, checkpoint: str, train_dataset: str) -> str:
    """``attribution/<model>/<checkpoint>/<train dataset>``: every result of the attribution stage for that run."""
    return f"attribution/{model}/{checkpoint}/{train_dataset}"


# A score group's directory is the only one at this depth with a '.' in its name (<query dataset>.<query
# variant>), so neither `benchmarks/` nor `groundtruth/` (no '.') can ever be listed as scores.
SCORE_GROUPS = "attribution/*/*/*/*.*/*"
BENCHMARKS = "attribution/*/*/*/benchmarks/*"
LEGACY_BENCHMARKS = "evaluations/*/*/*/attribution/*"  # where lakes written before kept them


def score_query_set(query_dataset: str, query_variant: str) -> str:
    """A score group's parent: the queries' dataset and variant, joined by the '.' that marks score groups."""
    return f"{query_dataset}.{query_variant}"


def score_group_path(model: str, checkpoint: str, train_dataset: str, query_dataset: str, query_variant: str,
                     method: str) -> str:
    """``attribution/<model>/<checkpoint>/<train>/<query dataset>.<query variant>/<method>``: a method's scores."""
    return f"{attribution_dir(model, checkpoint, train_dataset)}/{score_query_set(query_dataset, query_variant)}/{key(method)}"


def benchmark_dir(model: str, checkpoint: str, train_dataset: str, label: str) -> str:
    """``attribution/<model>/<checkpoint>/<train>/benchmarks/<label>``: an attribution benchmark (a result).

    `label` names the queries: their variant, or ``<query dataset>.<variant>`` for another dataset's."""
    return f"{attribution_dir(model, checkpoint, train_dataset)}/benchmarks/{label}"


def legacy_benchmark_dir(model: str, checkpoint: str, train_dataset: str, label: str) -> str:
    """``evaluations/<model>/<checkpoint>/<train>/attribution/<label>``: where earlier lakes kept a benchmark."""
    return f"evaluations/{model}/{checkpoint}/{train_dataset}/attribution/{label}"


def parse_benchmark_dir(path: str) -> dict[str, str]:
    """model, checkpoint, dataset (the training dataset) and queries of a benchmark directory, in either layout."""
    parts = path.strip("/").split("/")
    if len(parts) != 6 or (parts[0], parts[4]) not in (("attribution", "benchmarks"), ("evaluations", "attribution")):
        raise ValueError(f"{path!r} is not a benchmark directory (attribution/<model>/<checkpoint>/<dataset>/"
                         "benchmarks/<queries>, or evaluations/<model>/<checkpoint>/<dataset>/attribution/<queries>)")
    return {"model": parts[1], "checkpoint": parts[2], "dataset": parts[3], "queries": parts[5]}


def ground_truth_dir(model: str, checkpoint: str, train_dataset: str, label: str) -> str:
    """``attribution/<model>/<checkpoint>/<train>/groundtruth/<label>``: retrained models' losses on the queries."""
    return f"{attribution_dir(model, checkpoint, train_dataset)}/groundtruth/{label}"


def legacy_ground_truth_dir(model: str, checkpoint: str, train_dataset: str, label: str) -> str:
    """``groundtruth/<model>/<checkpoint>/<train>/<label>``: where earlier lakes kept the ground truth."""
    return f"groundtruth/{model}/{checkpoint}/{train_dataset}/{label}"


def lds_dir(truth_dir: str, key: str) -> str:
    """``<ground truth>/lds-<key>``: one set of LDS retrainings (`key` hashes what determines them)."""
    return f"{truth_dir}/lds-{key}"


def counterfactual_dir(truth_dir: str, key: str) -> str:
    """``<ground truth>/cf-<key>``: one set of counterfactual-removal retrainings."""
    return f"{truth_dir}/cf-{key}"


def lds_subsets_file(lds: str) -> str:
    """The subsets, seeds and retrainings of an LDS directory (`lds_dir`)."""
    return f"{lds}/subsets.json"


def ground_truth_losses_file(run_dir: str, name: str) -> str:
    """``<lds or cf directory>/losses/<name>.parquet``: one retrained model's query losses."""
    return f"{run_dir}/losses/{name}.parquet"


# ---------------------------------------------------------------- model tracing

TRACING = "tracing/*/*/*/*"  # one result per (base, candidate)
TRACING_BASES = "tracing/*/*"  # each holds summary.parquet and summary.md


def tracing_base_dir(base: str, checkpoint: str) -> str:
    """``tracing/<base>/<checkpoint>``: every candidate traced against this base, and their summary."""
    return f"tracing/{base}/{checkpoint}"


def tracing_dir(base: str, base_checkpoint: str, candidate: str, candidate_checkpoint: str,
                permute_seed: int | None = None) -> str:
    """``tracing/<base>/<checkpoint>/<candidate>/<checkpoint>``: one tracing result (a result: lake.results).

    The control run (the candidate permuted first, with `permute_seed`) is a result of its own:
    ``.../<candidate>/<checkpoint>-permuted-s<seed>``, beside the real one, never over it."""
    control = "" if permute_seed is None else f"-permuted-s{int(permute_seed)}"
    return f"{tracing_base_dir(base, base_checkpoint)}/{candidate}/{candidate_checkpoint}{control}"


# ---------------------------------------------------------------- claims (outside every Zarr group)

CLAIMS_ROOT = ".gradlake"


def claim_file(claim: str) -> str:
    """``.gradlake/<claim>.json``: the object of a claim (see lake.claims)."""
    return f"{CLAIMS_ROOT}/{claim}.json"


def creation_claim(group_path: str) -> str:
    """The claim that a run is creating the group at `group_path`."""
    return f"create/{group_path}"


def lease_claim(group_path: str, index: int) -> str:
    """The lease on row-chunk `index` of the group at `group_path`."""
    return f"leases/{group_path}/{index}"


# ---------------------------------------------------------------- chunks and shards

def column_chunk(rows: int, numel: int, itemsize: int) -> int:
    """Columns per chunk so that a chunk of `rows` samples stays under CHUNK_BYTES."""
    return max(1, min(numel, CHUNK_BYTES // max(1, rows * itemsize)))


def shard_columns(rows: int, numel: int, itemsize: int, object_bytes: int) -> int | None:
    """Columns per object (Zarr v3 shard) of a gradient array: a row-chunk's column chunks gathered into
    objects of up to `object_bytes`; None where that gathers nothing (one chunk per object).

    A row-chunk of one tensor is written whole by one worker (its lease), so a shard never has
    two writers, and every write covers whole shards.  OLMo-2-7B, every tensor in 16 bits, 8
    rows: 7,089 objects per row-chunk with one per chunk, 595 with objects of up to 256 MiB.
    """
    cols = column_chunk(rows, numel, itemsize)
    per_object = min(-(-numel // cols), object_bytes // max(1, rows * cols * itemsize))
    return cols * per_object if per_object > 1 else None


def token_rows(n_samples: int, width: int) -> int:
    """Rows per chunk of the token arrays (`input_ids`, `label_mask`): as many as fit CHUNK_BYTES."""
    return max(1, min(n_samples, CHUNK_BYTES // max(1, 4 * width)))


def n_shards(n_samples: int, shard_size: int) -> int:
    return math.ceil(n_samples / shard_size)


def n_chunks(n_samples: int, chunk_rows: int) -> int:
    """Row-chunks of a group: the unit in which it is stored and recorded complete."""
    return math.ceil(n_samples / chunk_rows)


def chunk_bounds(index: int, n_samples: int, chunk_rows: int) -> tuple[int, int]:
    """Samples [start, stop) of row-chunk `index`; the last may be short."""
    start = index * chunk_rows
    if index < 0 or start >= n_samples:
        raise IndexError(f"chunk {index} is out of range for {n_samples} samples in chunks of {chunk_rows}")
    return start, min(start + chunk_rows, n_samples)


def chunks_in(start: int, stop: int, chunk_rows: int) -> range:
    """Indexes of the row-chunks that hold any of the samples [start, stop)."""
    return range(start // chunk_rows, -(-stop // chunk_rows)) if stop > start else range(0)


def shard_bounds(index: int, n_samples: int, shard_size: int) -> tuple[int, int]:
    """Samples [start, stop) of shard `index`; the last shard may be short, none is empty."""
    start = index * shard_size
    if index < 0 or start >= n_samples:
        raise IndexError(f"shard {index} is out of range for {n_samples} samples in shards of {shard_size}")
    return start, min(start + shard_size, n_samples)
