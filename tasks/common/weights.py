"""A checkpoint's weight files checked before anything is loaded: present, safe to read, and the config's shapes.

Only directory listings and safetensors headers are read (ranged reads on a URL), so a plan can refuse a
checkpoint that is incomplete, pickled without leave, or not the config's model, before any weight moves.
"""

from __future__ import annotations

import json
import re

from gradlake.tasks.common.model import ModelError, ModelSpec, check_device, checkpoint_location, skeleton


_SAFE_INDEX = "model.safetensors.index.json"
_PICKLED, _PICKLED_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _shards(fs, directory: str, index: str, where: str) -> list[str]:
    """The weight files a sharded checkpoint's index names; each must be there."""
    try:
        weight_map = json.loads(fs.cat_file(f"{directory}/{index}")).get("weight_map") or {}
    except (ValueError, AttributeError) as err:
        raise ModelError(f"{where}/{index} is not a valid weight index ({err}); write the checkpoint again") from None
    shards = sorted(set(weight_map.values()))
    if not shards:
        raise ModelError(f"{where}/{index} names no weight file; write the checkpoint again")
    missing = [s for s in shards if not fs.exists(f"{directory}/{s}")]
    if missing:
        raise ModelError(f"{where}/{index} names {len(shards)} weight files, {len(missing)} of them missing ({missing[:5]}); "
                         "the checkpoint is incomplete: copy or write it again")
    return shards


def check_weights(spec: ModelSpec, config, device_here: bool = True) -> None:
    """Check that the model can be loaded as asked, reading no weight: one ModelError line otherwise.

    Always (unless `device_here` is off: a plan made on an orchestrator for work on other machines,
    whose workers check it when they load the model): the device exists.  For a local directory or a URL also: weight files are there
    (every shard an index names), pickled weights only when `allow_pickled_weights` says so,
    every safetensors file as long as its header says, and the headers' tensor shapes agree
    with the config.  Only listings and safetensors headers are read (ranged reads on a URL).
    """
    from gradlake.tasks.common.checkpoints import safetensors_header

    spec = spec.resolved()
    if device_here:
        check_device(spec)
    if not (spec.is_local or spec.is_url):
        # A hub id's weights are fetched by from_pretrained when the model is loaded; the plan fetched only
        # config.json.  Listing the repository and reading its headers would need the network in every plan
        # (and a cache with half the shards is completed by the download, not wrong), so for a hub id the
        # weight files, their headers and shapes, and pickled weights are left to the load.
        return
    fs, directory, where = checkpoint_location(spec)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False))
    # The order from_pretrained looks for weights in: safetensors first, a single file before an index.
    if "model.safetensors" in names:
        files = ["model.safetensors"]
    elif _SAFE_INDEX in names:
        files = _shards(fs, directory, _SAFE_INDEX, where)
    else:
        _check_pickled(spec, fs, directory, where, names)
        return  # a pickle's shapes are only known by unpickling it, which is loading it: left to the load
    headers = {}
    for file in files:
        try:
            headers[file] = safetensors_header(fs, f"{directory}/{file}")
        except ValueError as err:  # the file itself is wrong; an OSError (storage, network) stays one to retry
            raise ModelError(f"weight file {where}/{file} {err}; the checkpoint is incomplete or damaged: "
                             "copy or write it again") from None
    _check_shapes(spec, config, headers, where)


def _check_pickled(spec: ModelSpec, fs, directory: str, where: str, names: list[str]) -> None:
    pickled = [n for n in names if n.endswith((".bin", ".pt")) or n == _PICKLED_INDEX]
    if not pickled:
        held = ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "")
        raise ModelError(f"{where} has no weights: no model.safetensors, {_SAFE_INDEX} or {_PICKLED}; it holds {held or 'nothing'}")
    if not spec.allow_pickled_weights:
        raise ModelError(f"{where} has only pickled weights ({', '.join(pickled[:5])}): unpickling can run code, so they are "
                         "refused; convert them to model.safetensors (load and save_pretrained them once, where you trust "
                         "them), or allow them with allow_pickled_weights=True (gradlake extract --allow-pickled-weights)")
    if _PICKLED in names:
        return
    if _PICKLED_INDEX in names:
        _shards(fs, directory, _PICKLED_INDEX, where)
        return
    raise ModelError(f"{where} has pickled weights ({', '.join(pickled[:5])}) but none that from_pretrained loads: "
                     f"it reads {_PICKLED} or {_PICKLED_INDEX}; convert the weights to model.safetensors")


def _check_shapes(spec: ModelSpec, config, headers: dict[str, dict], where: str) -> None:
    """Every parameter of the config is in the files (itself or a weight tied to it), with the config's shape."""
    model = skeleton(spec, config)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        renamed = bool(get_model_conversion_mapping(model, add_legacy=False))
    except ImportError:  # transformers 4: renames are a class attribute of the few models that have them
        renamed = bool(getattr(model, "_checkpoint_conversion_mapping", None))
    if renamed:
        return  # transformers renames (and fuses, e.g. MoE experts) this model's tensors on load: names differ by design
    stored = {name: (tuple(entry.get("shape", ())), file) for file, header in headers.items()
              for name, entry in header.items() if name != "__metadata__"}
    prefix = f"{model.base_model_prefix}."
    stored |= {prefix + n: v for n, v in stored.items() if prefix + n not in stored}  # saved from the base model
    aliases: dict[int, list[str]] = {}  # tied weights are one parameter under several names
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    mismatched, missing = [], []
    for name, parameter in model.named_parameters():
        found = [n for n in aliases[id(parameter)] if n in stored]
        if not found:
            if not any(p.search(name) for p in ignored):
                missing.append(name)
            continue
        for n in found:
            shape, file = stored[n]
            if shape != tuple(parameter.shape):
                mismatched.append(f"{n} is {list(shape)} in {file}, the config makes it {list(parameter.shape)}")
    if mismatched:
        raise ModelError(f"{where}: the weights disagree with config.json in {len(mismatched)} tensors (first: {mismatched[0]}); "
                         "the config does not belong to these weights: restore the checkpoint's own config.json")
    if missing:
        raise ModelError(f"{where}: the weight files lack {len(missing)} parameters the config defines (first: {missing[:3]}); "
                         "the checkpoint is incomplete or its config is another model's")
