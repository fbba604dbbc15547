"""The paraphrased variant: the real openai client over HTTP to a loopback server with injected faults."""

from __future__ import annotations

import json
import pickle
import traceback
import uuid
from collections import Counter

import pandas as pd
import pytest
from openai_server import Fault, paraphrase_of
from prefect import flow

from gradlake.lake.store import LakeStore
from gradlake.tasks.data.paraphrase import (CACHE_DIR, cache_path, ParaphraseError, ParaphraseFailed, ParaphraseSpec,
    paraphrase_messages, paraphrase_task, read_cache, settings_key)
from gradlake.tasks.data.probes import load_probe_set, probe_variant


def probes(n: int = 30) -> pd.DataFrame:
    return probe_variant(load_probe_set().head(n), "original")


def user_texts(frame: pd.DataFrame) -> list[str]:
    return [t["content"] for messages in frame["messages"] for t in messages if t["role"] == "user"]


def spec_for(server, **settings) -> ParaphraseSpec:
    # Few retries, short timeouts: a test that goes wrong fails fast.
    return ParaphraseSpec(**{"model": "test-paraphraser", "base_url": server.base_url, "max_retries": 3,
                             "timeout_s": 10, **settings})


def expected(frame: pd.DataFrame) -> list[list[dict]]:
    """The reference: every user turn replaced by the server's transform, every other turn as it was."""
    return [[{**t, "content": paraphrase_of(t["content"])} if t["role"] == "user" and t["content"].strip() else t
             for t in messages] for messages in frame["messages"]]


def test_faults_are_retried_and_every_user_turn_paraphrased_once(openai_server, tmp_path):
    frame = probes()
    texts = user_texts(frame)
    assert len(set(texts)) == 30
    openai_server.inject(Fault(429, times=6), Fault(500, prompt=texts[3], times=2), Fault(503, prompt=texts[7]),
                         Fault("drop", prompt=texts[5]), Fault("drop", prompt=texts[11]))
    before = frame.copy(deep=True)
    logs: list[str] = []
    spec = spec_for(openai_server)
    out = paraphrase_messages(frame, spec, LakeStore(str(tmp_path / "lake")), log=logs.append)

    assert Counter(openai_server.statuses()) == {200: 30, 429: 6, 500: 2, 503: 1, "drop": 2}  # every fault fired
    assert Counter(openai_server.successes()) == Counter(texts)  # one successful answer per text
    assert list(out["id"]) == list(frame["id"]) and list(out["topic"]) == list(frame["topic"])
    assert list(out["messages"]) == expected(frame)
    assert frame.equals(before)  # the input is left alone
    assert out.attrs["paraphrase"] == {"user_texts": 30, "cached": 0, "requested": 30}
    assert {(s.model, s.system, s.temperature, s.seed) for s in openai_server.seen} == {
        ("test-paraphraser", spec.system_prompt, 0.7, 0)}
    assert any("30/30" in line for line in logs)
    assert not any(openai_server.api_key in line for line in logs)


def test_multi_turn_chats_paraphrase_every_user_turn_and_nothing_else(openai_server, tmp_path):
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."},
         {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And an even one?"},
         {"role": "assistant", "content": "Two."}],
        [{"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": "Four."}],
        [{"role": "user", "content": "  "}, {"role": "assistant", "content": "You said nothing."}],
    ]
    frame = pd.DataFrame({"id": ["a", "b", "c"], "messages": chats})
    out = paraphrase_messages(frame, spec_for(openai_server), LakeStore(str(tmp_path / "lake")), log=lambda _: None)
    assert list(out["messages"]) == expected(frame)
    assert out["messages"][0][0] == {"role": "system", "content": "Be brief."}
    # A text shared by two samples is asked once; a blank turn is not asked at all.
    assert sorted(openai_server.successes()) == ["And an even one?", "Name a prime number."]
    assert out.attrs["paraphrase"] == {"user_texts": 2, "cached": 0, "requested": 2}


def test_rerun_makes_no_request_and_new_samples_or_settings_only_ask_for_what_is_new(openai_server, tmp_path):
    lake = str(tmp_path / "lake")
    spec = spec_for(openai_server)
    first = paraphrase_messages(probes(), spec, LakeStore(lake), log=lambda _: None)
    assert len(openai_server.seen) == 30

    again = paraphrase_messages(probes(), spec, LakeStore(lake), log=lambda _: None)
    assert len(openai_server.seen) == 30  # no new request
    assert list(again["messages"]) == list(first["messages"])
    assert again.attrs["paraphrase"] == {"user_texts": 30, "cached": 30, "requested": 0}

    grown = probes(40)
    paraphrase_messages(grown, spec, LakeStore(lake), log=lambda _: None)
    assert sorted(openai_server.successes()[30:]) == sorted(user_texts(grown)[30:])

    # Other settings are other answers: nothing is shared with the first cache.
    paraphrase_messages(probes(5), spec_for(openai_server, temperature=0.2), LakeStore(lake), log=lambda _: None)
    assert len(openai_server.seen) == 45


def test_a_crash_midway_then_a_rerun_asks_only_for_what_was_not_cached(openai_server, tmp_path):
    frame = probes()
    texts = user_texts(frame)
    store = LakeStore(str(tmp_path / "lake"))
    spec = spec_for(openai_server, max_concurrency=4, max_retries=1)
    # The server goes down after 12 answers and stays down past the client's retries.
    openai_server.inject(Fault(503, times=None, after=12))
    with pytest.raises(ParaphraseFailed, match="503") as failed:
        paraphrase_messages(frame, spec, store, log=lambda _: None)
    assert not isinstance(failed.value, ValueError)  # so Prefect retries the task
    assert openai_server.base_url in str(failed.value)
    cached = read_cache(store, spec, texts)
    assert 0 < len(cached) <= 12
    assert all(cached[t] == paraphrase_of(t) for t in cached)

    # A partial write (or any garbage) counts as missing, and is asked again.
    garbled = next(t for t in texts if t in cached)
    store.fs.pipe_file(cache_path(store, spec, garbled), b'{"text": "trunc')
    del cached[garbled]

    openai_server.reset()
    out = paraphrase_messages(frame, spec, store, log=lambda _: None)
    assert sorted(s.prompt for s in openai_server.seen) == sorted(set(texts) - set(cached))
    assert Counter(openai_server.successes()) == Counter(set(texts) - set(cached))
    assert list(out["messages"]) == expected(frame)
    assert out.attrs["paraphrase"] == {"user_texts": 30, "cached": len(cached), "requested": 30 - len(cached)}


def test_an_empty_paraphrase_names_its_sample_and_the_rest_is_kept(openai_server, tmp_path):
    frame = probes(6)
    texts = user_texts(frame)
    store = LakeStore(str(tmp_path / "lake"))
    openai_server.inject(Fault("empty", prompt=texts[2]))
    with pytest.raises(ParaphraseFailed, match=frame["id"][2]):
        paraphrase_messages(frame, spec_for(openai_server), store, log=lambda _: None)
    openai_server.reset()
    out = paraphrase_messages(frame, spec_for(openai_server), store, log=lambda _: None)
    assert [s.prompt for s in openai_server.seen] == [texts[2]]
    assert list(out["messages"]) == expected(frame)


def _whole_text(error: BaseException) -> str:
    """Everything a log or a stored state could show of an error: its traceback and its pickle."""
    return "".join(traceback.format_exception(error)) + repr(pickle.dumps(error))


def test_a_bad_key_is_one_clear_error_that_never_shows_the_key(openai_server, tmp_path, monkeypatch):
    wrong = "sk-wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    store = LakeStore(str(tmp_path / "lake"))
    spec = spec_for(openai_server)
    logs: list[str] = []
    with pytest.raises(ParaphraseError) as failed:
        paraphrase_messages(probes(), spec, store, log=logs.append)
    message = str(failed.value)
    assert "401" in message and openai_server.base_url in message and "$OPENAI_API_KEY" in message
    assert isinstance(failed.value, ValueError)
    assert wrong not in _whole_text(failed.value) and not any(wrong in line for line in logs)
    # The server did quote the key back, so leaving it out was tested; the other requests were cancelled.
    assert set(openai_server.statuses()) == {401}
    assert len(openai_server.seen) <= spec.max_concurrency
    assert not store.fs.exists(store.path(CACHE_DIR))


def test_an_unknown_model_is_one_clear_error(openai_server, tmp_path):
    spec = spec_for(openai_server, model="no-such-model")
    with pytest.raises(ParaphraseError, match=r"model 'no-such-model' is not served at http://127\.0\.0\.1:\d+/v1") as failed:
        paraphrase_messages(probes(), spec, LakeStore(str(tmp_path / "lake")), log=lambda _: None)
    assert "404" in str(failed.value) and openai_server.api_key not in _whole_text(failed.value)
    assert len(openai_server.seen) <= spec.max_concurrency


def test_a_missing_key_fails_before_any_request(openai_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ParaphraseError, match=r"\$OPENAI_API_KEY is unset"):
        paraphrase_messages(probes(), spec_for(openai_server), LakeStore(str(tmp_path / "lake")))
    with pytest.raises(ParaphraseError, match=r"\$GRADLAKE_TEST_PARAPHRASE_KEY is unset"):
        paraphrase_messages(probes(), spec_for(openai_server, api_key_env="GRADLAKE_TEST_PARAPHRASE_KEY"),
                            LakeStore(str(tmp_path / "lake")))
    assert openai_server.seen == []


def test_the_key_can_come_from_a_prefect_secret_block(openai_server, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    name = f"paraphrase-key-{uuid.uuid4().hex[:8]}"
    Secret(value=openai_server.api_key).save(name)
    monkeypatch.delenv("OPENAI_API_KEY")
    out = paraphrase_messages(probes(3), spec_for(openai_server, api_key_block=name), LakeStore(str(tmp_path / "lake")),
                              log=lambda _: None)
    assert list(out["messages"]) == expected(probes(3))
    with pytest.raises(ParaphraseError, match="no Prefect Secret block named 'no-such-block'"):
        paraphrase_messages(probes(3), spec_for(openai_server, api_key_block="no-such-block"),
                            LakeStore(str(tmp_path / "lake2")))


def test_the_cache_works_on_s3(openai_server, s3_endpoint):
    lake = f"s3://lake/paraphrase-{uuid.uuid4().hex[:8]}"
    frame = probes(10)
    spec = spec_for(openai_server)
    out = paraphrase_messages(frame, spec, LakeStore(lake), log=lambda _: None)
    assert list(out["messages"]) == expected(frame)
    store = LakeStore(lake)
    files = store.fs.find(store.path(f"{CACHE_DIR}/{settings_key(spec)}"))
    assert len(files) == 10
    entry = json.loads(store.fs.cat_file(files[0]))
    assert entry["paraphrase"] == paraphrase_of(entry["text"]) and openai_server.api_key not in json.dumps(entry)

    again = paraphrase_messages(frame, spec, LakeStore(lake), log=lambda _: None)
    assert len(openai_server.seen) == 10  # no new request
    assert again.attrs["paraphrase"]["cached"] == 10


def test_the_prefect_task_runs_and_does_not_retry_a_bad_key(openai_server, tmp_path, monkeypatch):
    lake = str(tmp_path / "lake")

    @flow
    def paraphrase_flow(spec: ParaphraseSpec) -> pd.DataFrame:
        return paraphrase_task(probes(4), spec, lake)

    out = paraphrase_flow(spec_for(openai_server))
    assert list(out["messages"]) == expected(probes(4))

    monkeypatch.setenv("OPENAI_API_KEY", "sk-revoked")
    state = paraphrase_flow(spec_for(openai_server, temperature=0.1, max_retries=0), return_state=True)
    assert state.is_failed()
    with pytest.raises(ParaphraseError, match="rejected the key"):
        state.result()
    # One try: a ValueError is not retried. The samples' requests run concurrently and the first 401 ends the
    # task, so the others may be cancelled before they reach the server: at most one request per sample.
    refused = openai_server.statuses()[4:]
    assert 1 <= len(refused) <= 4 and set(refused) == {401}, refused


def test_it_runs_from_code_that_already_has_an_event_loop(openai_server, tmp_path):
    import asyncio

    async def notebook_cell() -> pd.DataFrame:
        return paraphrase_messages(probes(3), spec_for(openai_server), LakeStore(str(tmp_path / "lake")),
                                   log=lambda _: None)

    assert list(asyncio.run(notebook_cell())["messages"]) == expected(probes(3))
