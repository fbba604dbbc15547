"""Which model, at which checkpoint: the `ModelSpec`, its presets, validation and loading.

A model is a Hugging Face id (``amd/AMD-OLMo-1B-SFT``), a local directory, or an
fsspec URL (``s3://bucket/run``, where ``train-model`` writes).  A checkpoint is, for a
hub id, a revision (branch, tag or commit); for a directory or URL, a subdirectory
holding a saved checkpoint (``checkpoint-1000``).  A checkpoint at a URL is downloaded
once into ``$GRADLAKE_MODEL_CACHE`` (default ``~/.cache/gradlake/models``) and loaded
from there.  One code path loads every causal LM that ``AutoModelForCausalLM`` knows;
per-sample gradients are taken of the architectures in :data:`GRADIENT_ARCHITECTURES`,
each checked against one plain ``loss.backward()`` per sample (tests/test_gradients.py),
and any other is refused when the extraction is planned.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PRESETS: dict[str, dict] = {
    "amd-olmo-1b-sft": {"model": "amd/AMD-OLMo-1B-SFT", "dtype": "bfloat16"},
    "olmo-2-7b-sft": {"model": "allenai/OLMo-2-1124-7B-SFT", "dtype": "bfloat16"},
}


class ModelError(ValueError):
    """A model or checkpoint that cannot be used, with what would be accepted."""


# model_type -> the class AutoModelForCausalLM builds: the architectures whose per-sample gradients (every
# parameter, and the input embeddings) are tested equal to a plain backward per sample.
GRADIENT_ARCHITECTURES: dict[str, str] = {
    "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
}


def check_gradient_architecture(config, label: str) -> None:
    """One ModelError line unless per-sample gradients of this architecture are supported (from the config alone)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GRADIENT_ARCHITECTURES:
        found = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise ModelError(f"{label} is a {found} (model_type {model_type!r}); per-sample gradients are supported for "
                         f"{', '.join(GRADIENT_ARCHITECTURES.values())} only")


class ModelSpec(BaseModel):
    """The model under study and the checkpoint of it to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hugging Face model id (e.g. 'amd/AMD-OLMo-1B-SFT') or a local directory; a preset name ('amd-olmo-1b-sft', 'olmo-2-7b-sft') also works.")
    checkpoint: str | None = Field(default=None, description="Hub revision (branch, tag, commit) for a hub id, or a checkpoint subdirectory for a local directory; empty means the main revision / the directory itself.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype the model is loaded and differentiated in; gradients are stored as float32 unless the extraction asks otherwise.")
    device: str = Field(default="auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    trust_remote_code: bool = Field(default=False, description="Allow the model repository's own Python code to run. Off unless you trust it.")
    allow_pickled_weights: bool = Field(default=False, description="Load pickled weights (pytorch_model.bin) when the checkpoint has no safetensors; they are read with torch.load(weights_only=True). Off unless you trust the files: convert them to model.safetensors instead where you can.")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str | None) -> str | None:
        # A checkpoint is read below the model's directory (or downloaded into its cache) and names lake paths.
        if value and (value.startswith("/") or "\\" in value or any(part in (".", "..") for part in value.split("/"))):
            raise ValueError(f"checkpoint {value!r} is not a subdirectory or revision name: give it relative to the "
                             "model (e.g. 'checkpoint-000100', 'main', 'refs/pr/1'), with no leading '/' and no '..'")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"device {value!r} is not known; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelSpec":
        """A spec for a named preset ('amd-olmo-1b-sft', 'olmo-2-7b-sft') with overrides."""
        if name not in PRESETS:
            raise ModelError(f"preset {name!r} is not known; presets are {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def resolved(self) -> "ModelSpec":
        """The same spec with a preset name replaced by its model id."""
        if self.model in PRESETS:
            return self.model_copy(update={"model": PRESETS[self.model]["model"]})
        return self

    @property
    def is_local(self) -> bool:
        return _looks_local(self.model)

    @property
    def is_url(self) -> bool:
        return is_url(self.model)

    def source(self) -> tuple[str, str | None]:
        """Where `from_pretrained` loads from: (path or id, revision or None); a URL's checkpoint is downloaded first."""
        spec = self.resolved()
        if spec.is_url:
            return str(cached_checkpoint(spec.model, spec.checkpoint)), None
        if spec.is_local:
            root = Path(spec.model).expanduser()
            return str(root / spec.checkpoint if spec.checkpoint else root), None
        return spec.model, spec.checkpoint or "main"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def lake_names(spec: ModelSpec) -> tuple[str, str]:
    """How lineage names a model and its checkpoint: (hub id or absolute path, revision or subdirectory).

    An unnamed checkpoint is 'main' on the hub and 'default' for a local directory.
    """
    spec = spec.resolved()
    if spec.is_url:
        return spec.model.rstrip("/"), spec.checkpoint or "default"
    if spec.is_local:
        return os.path.abspath(os.path.expanduser(spec.model)), spec.checkpoint or "default"
    return spec.model, spec.checkpoint or "main"


def is_url(model: str) -> bool:
    return "://" in model


def _looks_local(model: str) -> bool:
    return (is_url(model) or model.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(model))
            or model.count("/") > 1)


HUB_CHECK_SECONDS = 60.0  # how long one look at whether the hub answers is trusted
_hub_checked: dict[str, tuple[float, str | None]] = {}


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be asked now ('HF_HUB_OFFLINE is set', 'connection refused', ...), or None."""
    from huggingface_hub import constants

    from gradlake.tasks.common.retries import not_answering

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    now = time.monotonic()
    checked = _hub_checked.get(constants.ENDPOINT)
    if checked is None or now - checked[0] > HUB_CHECK_SECONDS:
        checked = _hub_checked[constants.ENDPOINT] = (now, not_answering(constants.ENDPOINT))
    return checked[1]


def hub_options(spec: ModelSpec) -> dict:
    """`from_pretrained`'s keywords for where the spec's files are: a hub id's revision, and the local cache only
    while the hub cannot be reached; nothing for a directory."""
    revision = spec.source()[1]
    if revision is None:
        return {}
    return {"revision": revision, "local_files_only": hub_offline() is not None}


def not_on_hub(spec: ModelSpec, revision: str, why: str) -> str:
    """What to do about a hub model that is not in the local cache while the hub cannot be asked."""
    from huggingface_hub import constants

    spec = spec.resolved()
    asked = ("HF_HUB_OFFLINE is set, so the hub is not asked" if why == "HF_HUB_OFFLINE is set"
             else f"the hub at {constants.ENDPOINT} cannot be reached ({why})")
    return (f"it is not in the Hugging Face cache here ({constants.HF_HUB_CACHE}) "
            f"and {asked}; pass a local directory holding the checkpoint (config.json and weights) as the model, or "
            f"download it where the hub answers (`hf download {spec.model} --revision {revision}`) into this cache "
            "(HF_HUB_CACHE), or fix the connection (HF_ENDPOINT, HTTPS_PROXY)")


def url_filesystem(url: str):
    import fsspec

    from gradlake.lake.store import storage_options_for

    return fsspec.core.url_to_fs(url, **storage_options_for(url))


def cached_checkpoint(url: str, checkpoint: str | None) -> Path:
    """A checkpoint under a URL as a local directory: downloaded once (whole, then renamed into place)."""
    fs, root = url_filesystem(url)
    remote = f"{root.rstrip('/')}/{checkpoint}" if checkpoint else root.rstrip("/")
    cache_root = Path(os.environ.get("GRADLAKE_MODEL_CACHE", "~/.cache/gradlake/models")).expanduser()
    target = cache_root / hashlib.sha256(f"{url.rstrip('/')}|{checkpoint or ''}".encode()).hexdigest()[:24]
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    fs.get(remote, str(staging), recursive=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process put the same checkpoint there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _local_checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def checkpoint_location(spec: ModelSpec) -> tuple:
    """(filesystem, path on it, name for messages) of a local or URL checkpoint directory; nothing is downloaded."""
    import fsspec

    if spec.is_url:
        fs, root = url_filesystem(spec.model)
        where = spec.model.rstrip("/") + (f"/{spec.checkpoint}" if spec.checkpoint else "")
        return fs, f"{root.rstrip('/')}/{spec.checkpoint}" if spec.checkpoint else root.rstrip("/"), where
    root = Path(spec.model).expanduser()
    directory = str(root / spec.checkpoint if spec.checkpoint else root)
    return fsspec.filesystem("file"), directory, directory


def check_model(spec: ModelSpec):
    """Load the model's config, or raise one clear error naming what is wrong; no weights are read."""
    from transformers import AutoConfig

    spec = spec.resolved()
    if spec.is_url:
        fs, root = url_filesystem(spec.model)
        directory = checkpoint_location(spec)[1]
        if not fs.exists(f"{directory}/config.json"):
            found = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.exists(f"{p}/config.json")) \
                if fs.isdir(root) else []
            raise ModelError(f"checkpoint {spec.checkpoint!r} of {spec.model!r} has no config.json; "
                             f"checkpoints found there: {found or 'none'}")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the config alone: the weights are fetched when loaded
            fs.get_file(f"{directory}/config.json", f"{tmp}/config.json")
            return AutoConfig.from_pretrained(tmp, trust_remote_code=spec.trust_remote_code)
    path, revision = spec.source()
    if spec.is_local:
        root = Path(spec.model).expanduser()
        if not root.is_dir():
            raise ModelError(f"model path {spec.model!r} does not exist; pass a Hugging Face id or a directory with config.json")
        if not (Path(path) / "config.json").is_file():
            found = _local_checkpoints(root)
            what = f"checkpoint {spec.checkpoint!r} of {spec.model!r}" if spec.checkpoint else f"model directory {spec.model!r}"
            hint = f"checkpoints found there: {found}" if found else "no subdirectory with a config.json was found there"
            raise ModelError(f"{what} has no config.json; {hint}")
    options = hub_options(spec)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **options)
    except Exception as err:  # transformers raises OSError/ValueError subclasses with long texts
        what = f"revision {revision!r} of {spec.model!r}" if revision else repr(path)
        if options.get("local_files_only") and (why := hub_offline()):
            raise ModelError(f"cannot load the config of {what}: {not_on_hub(spec, revision, why)}") from None
        raise ModelError(f"cannot load the config of {what}: {err}") from err


def skeleton(spec: ModelSpec, config):
    """The model built from its config on the meta device: names and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)


def parameter_shapes(spec: ModelSpec, config=None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's trainable parameters, from its config alone (meta device)."""
    config = config if config is not None else check_model(spec)
    return {n: tuple(p.shape) for n, p in skeleton(spec, config).named_parameters()}


def position_limit(config) -> int | None:
    """The most positions the model was built for (``max_position_embeddings``; GPT-2's ``n_positions``), if it says."""
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def capped_length(max_length: int, config, label: str) -> tuple[int, str | None]:
    """`max_length` capped by the model's positions, and the one line that says so when it is."""
    limit = position_limit(config)
    if limit is None or max_length <= limit:
        return max_length, None
    return limit, (f"max_length {max_length} is more than the {limit} positions of {label}: samples are cut at "
                   f"{limit} tokens")


def check_device(spec: ModelSpec) -> None:
    """One ModelError line unless the spec's device exists on this machine."""
    if spec.device in ("auto", "cpu"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.device.partition(":")[2] or 0)
    if index < count:
        return
    have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
    why = f"this machine has {count} CUDA device{'s' if count > 1 else ''}" if count else "this machine has no CUDA device"
    raise ModelError(f"device {spec.device!r} is not available: {why} (devices here: {have}); use 'auto' or 'cpu'")


def select_parameters(names: list[str], patterns: list[str] | None, model_label: str = "the model") -> list[str]:
    """Parameter names matching any glob pattern, in model order; every pattern must match something."""
    if not patterns:
        return list(names)
    chosen = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            example = next((n for n in names if ".layers.0." in n), names[0])
            raise ModelError(
                f"layer pattern {pattern!r} matched no parameter of {model_label}; "
                f"names look like {example!r} (globs: '*' matches across dots, e.g. 'model.layers.*.mlp.down_proj.weight')"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def load_tokenizer(spec: ModelSpec):
    """The tokenizer saved with the checkpoint (it must carry a chat template for `sft`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.source()[0], trust_remote_code=spec.trust_remote_code, **hub_options(spec))


@lru_cache(maxsize=2)
def load_model(spec: ModelSpec):
    """The model in eval mode on its device; cached so that consecutive shards load it once."""
    from transformers import AutoModelForCausalLM

    check_device(spec)  # a worker without the device asked for says so before reading any weight
    # Pickled weights are loaded only when allowed: check_weights refuses them in the plan for a directory or
    # URL, use_safetensors=True here for a hub id too.  Allowed, they must be read by torch's restricted
    # unpickler.  transformers 5.23 reads pytorch_model.bin through modeling_utils.load_state_dict, whose
    # torch.load has weights_only=True (its default, not passed on from from_pretrained; it refuses torch < 2.6);
    # from_pretrained's own weights_only, which earlier versions pass down, is set explicitly for those.
    # tests/test_model_checks.py checks that a pickle which would run code is refused.
    options = hub_options(spec)
    if options.get("local_files_only"):  # with peft installed, transformers 5.23 looks for an adapter config on the
        options["adapter_kwargs"] = {"local_files_only": True}  # hub without it, retrying for half a minute
    model = AutoModelForCausalLM.from_pretrained(
        spec.source()[0], dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code, weights_only=True,
        use_safetensors=None if spec.allow_pickled_weights else True, **options,
    )
    return model.to(spec.torch_device()).eval()


def resolved_commit(spec: ModelSpec) -> str:
    """What the checkpoint resolved to: the hub commit, or a content hash of a local checkpoint."""
    path, revision = spec.source()
    if revision is not None:
        from huggingface_hub import hf_hub_download

        # The config's place in the hub cache is snapshots/<commit>/ (offline, from the cache).
        return Path(hf_hub_download(path, "config.json", revision=revision,
                                    local_files_only=hub_options(spec)["local_files_only"])).parent.name
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.suffix in (".json", ".safetensors", ".bin") and file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, special tokens and chat template."""
    digest = hashlib.sha256()
    digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(tokenizer.all_special_tokens).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return "sha256:" + digest.hexdigest()[:32]
