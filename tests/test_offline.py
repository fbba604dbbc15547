"""A service that is not there fails at once, in one line that says where and what to do (the rule: test_retries.py).

Real sockets on loopback: a port that was just bound and closed refuses connections, as a server that is not
running does.  Nothing is mocked but where the hub lives (its endpoint, its cache)."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from prefect import flow

from gradlake.lake.store import LakeStore
from gradlake.tasks.common.model import ModelError, ModelSpec, check_model
from gradlake.tasks.data.paraphrase import ParaphraseError, ParaphraseSpec, paraphrase_messages, paraphrase_task
from gradlake.tasks.data.probes import load_probe_set, probe_variant
from test_retries import closed_port  # noqa: F401  a fixture: a loopback port nothing listens on


# ------------------------------------------------------------------ an API for paraphrases that is not there


def probes(n: int) -> pd.DataFrame:
    return probe_variant(load_probe_set().head(n), "original")


def test_an_api_that_is_not_there_is_one_error_in_seconds(closed_port, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    url = f"http://127.0.0.1:{closed_port}/v1"
    spec = ParaphraseSpec(model="gpt-4o-mini", base_url=url)  # the default retries
    said: list[str] = []
    started = time.monotonic()
    with pytest.raises(ParaphraseError) as raised:
        paraphrase_messages(probes(20), spec, LakeStore(str(tmp_path / "lake")), log=said.append)
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert url in message and "connection refused" in message and "base_url" in message
    assert "\n" not in message and raised.value.__cause__ is None
    assert said == []  # no request was sent, so no progress to tell


def test_the_prefect_task_does_not_retry_an_api_that_is_not_there(closed_port, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    url = f"http://127.0.0.1:{closed_port}/v1"

    @flow
    def paraphrase_flow(spec: ParaphraseSpec) -> pd.DataFrame:
        return paraphrase_task(probes(8), spec, str(tmp_path / "lake"))

    started = time.monotonic()
    state = paraphrase_flow(ParaphraseSpec(base_url=url), return_state=True)
    took = time.monotonic() - started
    assert state.is_failed()
    with pytest.raises(ParaphraseError, match=f"no API answers at {url}"):
        state.result()
    assert took < 20, took  # one try: a retry of the task would wait 10 s first


# ------------------------------------------------------------------ a hub model without the hub


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and no look at the hub remembered from another test."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("gradlake.tasks.common.model._hub_checked", {})
    from transformers import AutoConfig  # noqa: F401  imported before the clock starts: seconds on a busy machine

    return tmp_path / "hub"


def test_a_hub_model_with_hf_hub_offline_fails_at_once_saying_what_to_do(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelError) as raised:
        check_model(ModelSpec(model="amd/AMD-OLMo-1B-SFT"))
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "revision 'main' of 'amd/AMD-OLMo-1B-SFT'" in message and str(empty_hub) in message
    assert "HF_HUB_OFFLINE is set" in message and "local directory" in message
    assert "hf download amd/AMD-OLMo-1B-SFT --revision main" in message


def test_a_hub_model_without_network_fails_at_once_naming_the_hub(empty_hub, closed_port, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    started = time.monotonic()
    with pytest.raises(ModelError) as raised:
        check_model(ModelSpec(model="amd/AMD-OLMo-1B-SFT"))
    assert time.monotonic() - started < 5  # the hub client alone would retry for half a minute
    message = str(raised.value)
    assert f"the hub at {endpoint} cannot be reached (connection refused)" in message
    assert "local directory" in message and "HF_HUB_CACHE" in message
