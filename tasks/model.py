"""Which model, at which checkpoint: the `ModelSpec`, its presets, validation and loading.

A model is a Hugging Face id (``amd/AMD-OLMo-1B-SFT``), a local directory, or an
fsspec URL (``s3://bucket/run``, where ``train-model`` writes).  A checkpoint is, for a
hub id, a revision (branch, tag or commit); for a directory or URL, a subdirectory
holding a saved checkpoint (``checkpoint-1000``).  A checkpoint at a URL is downloaded
once into ``$GRADLAKE_MODEL_CACHE`` (default ``~/.cache/gradlake/models``) and loaded
from there.  One
code path serves every causal LM that ``AutoModelForCausalLM`` knows, among them
``OlmoForCausalLM`` (AMD-OLMo-1B) and ``Olmo2ForCausalLM`` (OLMo-2-7B).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
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


class ModelSpec(BaseModel):
    """The model under study and the checkpoint of it to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hugging Face model id (e.g. 'amd/AMD-OLMo-1B-SFT') or a local directory; a preset name ('amd-olmo-1b-sft', 'olmo-2-7b-sft') also works.")
    checkpoint: str | None = Field(default=None, description="Hub revision (branch, tag, commit) for a hub id, or a checkpoint subdirectory for a local directory; empty means the main revision / the directory itself.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype the model is loaded and differentiated in; gradients are stored as float32 unless the extraction asks otherwise.")
    device: str = Field(default="auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    trust_remote_code: bool = Field(default=False, description="Allow the model repository's own Python code to run. Off unless you trust it.")

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


def _url_fs(url: str):
    import fsspec

    from gradlake.lake.store import storage_options_for

    return fsspec.core.url_to_fs(url, **storage_options_for(url))


def cached_checkpoint(url: str, checkpoint: str | None) -> Path:
    """A checkpoint under a URL as a local directory: downloaded once (whole, then renamed into place)."""
    fs, root = _url_fs(url)
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


def check_model(spec: ModelSpec):
    """Load the model's config, or raise one clear error naming what is wrong; no weights are read."""
    from transformers import AutoConfig

    spec = spec.resolved()
    if spec.is_url:
        fs, root = _url_fs(spec.model)
        directory = f"{root.rstrip('/')}/{spec.checkpoint}" if spec.checkpoint else root.rstrip("/")
        if not fs.exists(f"{directory}/config.json"):
            found = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.exists(f"{p}/config.json")) \
                if fs.isdir(root) else []
            raise ModelError(f"checkpoint {spec.checkpoint!r} of {spec.model!r} has no config.json; "
                             f"checkpoints found there: {found or 'none'}")
        import tempfile

        from transformers import AutoConfig

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
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=spec.trust_remote_code)
    except Exception as err:  # transformers raises OSError/ValueError subclasses with long texts
        what = f"revision {revision!r} of {spec.model!r}" if revision else repr(path)
        raise ModelError(f"cannot load the config of {what}: {err}") from err


def parameter_shapes(spec: ModelSpec, config=None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's trainable parameters, from its config alone (meta device)."""
    from transformers import AutoModelForCausalLM

    config = config if config is not None else check_model(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


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

    path, revision = spec.source()
    return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=spec.trust_remote_code)


@lru_cache(maxsize=2)
def load_model(spec: ModelSpec):
    """The model in eval mode on its device; cached so that consecutive shards load it once."""
    from transformers import AutoModelForCausalLM

    path, revision = spec.source()
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code
    )
    return model.to(spec.torch_device()).eval()


def resolved_commit(spec: ModelSpec) -> str:
    """What the checkpoint resolved to: the hub commit, or a content hash of a local checkpoint."""
    path, revision = spec.source()
    if revision is not None:
        from huggingface_hub import hf_hub_download

        # The config's place in the hub cache is snapshots/<commit>/ (offline, from the cache).
        return Path(hf_hub_download(path, "config.json", revision=revision)).parent.name
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
