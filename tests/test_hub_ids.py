"""Hub ids and revisions go through the real `from_pretrained(id, revision=...)` path, offline.

A Hugging Face cache is laid out on disk as the hub client writes it (refs naming
commits, snapshots per commit), so nothing is downloaded and nothing is mocked.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from conftest import write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.lake import open_lake
from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
from gradlake.tasks.common.model import ModelError, ModelSpec

REPO_ID = "gradlake-test/tiny-olmo2"


@pytest.fixture
def hub_cache(tiny_models, tmp_path, monkeypatch):
    """A hub cache holding two revisions of REPO_ID: 'main' and the branch 'step-0'."""
    repo = tmp_path / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    commits = {}
    for ref, checkpoint in (("main", "checkpoint-1"), ("step-0", "checkpoint-0")):
        commit = hashlib.sha1(f"{ref}-{checkpoint}".encode()).hexdigest()
        shutil.copytree(tiny_models["olmo2"] / checkpoint, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        commits[ref] = commit
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(tmp_path / "hub"), raising=False)
    return commits


def test_revision_resolves_to_its_commit(hub_cache, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    for revision in ("main", "step-0"):
        spec = ExtractionSpec(model=ModelSpec(model=REPO_ID, checkpoint=revision), shard_size=4, batch_size=2,
                              layers=["lm_head.weight"], lake=lake)
        extract_gradients(spec)
    rows = open_lake(lake).catalog().query("kind == 'gradients'").set_index("checkpoint")
    assert rows.loc["main", "model_id"] == REPO_ID and rows.loc["main", "model"] == "gradlake-test--tiny-olmo2"
    assert rows.loc["main", "lineage.resolved_commit"] == hub_cache["main"]
    assert rows.loc["step-0", "lineage.resolved_commit"] == hub_cache["step-0"]
    assert rows.loc["main", "path"].startswith("gradients/gradlake-test--tiny-olmo2/main/")


def test_unknown_revision_is_one_clear_error(hub_cache, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    spec = ExtractionSpec(model=ModelSpec(model=REPO_ID, checkpoint="step-9"), shard_size=4, batch_size=2, lake=lake)
    with pytest.raises(ModelError, match=r"revision 'step-9' of 'gradlake-test/tiny-olmo2'"):
        plan_extraction(spec)
    assert not (tmp_path / "lake" / "gradients").exists()


def test_a_cached_revision_loads_at_once_while_the_hub_cannot_be_reached(hub_cache, monkeypatch):
    """Without HF_HUB_OFFLINE and without a hub (a closed loopback port), what the cache holds is read from it
    straight away: one look at the port, where the hub client alone would retry every file for half a minute
    (transformers' adapter lookup, with peft installed, even went to huggingface.co itself)."""
    import socket

    from gradlake.tasks.common.model import check_model, load_model, load_tokenizer, resolved_commit

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    to_port, lookups = [], []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def counted_connect(self, address):  # every client's connection passes here
        if isinstance(address, tuple) and address[1:2] == (port,):
            to_port.append(address)
        return connect(self, address)

    def counted_lookup(host, *args, **kwargs):  # and every name lookup (a hub elsewhere is looked up first)
        if host not in ("127.0.0.1", "localhost", "::1", None):
            lookups.append(host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", counted_connect)
    monkeypatch.setattr(socket, "getaddrinfo", counted_lookup)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    monkeypatch.setattr("gradlake.tasks.common.model._hub_checked", {})
    spec = ModelSpec(model=REPO_ID, checkpoint="step-0")
    assert check_model(spec).model_type == "olmo2"
    load_tokenizer(spec)
    assert resolved_commit(spec) == hub_cache["step-0"]
    load_model.__wrapped__(spec)  # past the cache of loaded models
    assert lookups == [], f"the hub was asked for elsewhere: {lookups[:3]}"
    # gradlake's one look, and at most huggingface_hub's own once-per-process registry fetch (one request, no retry)
    assert len(to_port) <= 2, f"{len(to_port)} connections to the unreachable hub"
