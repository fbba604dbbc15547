"""S3 that fails now and then: an extraction through a fault-injecting proxy (tests/s3proxy.py)
completes with the same bytes as one on a clean connection.

The proxy answers a seeded fraction of requests with 503 SlowDown, resets the connection
before forwarding, delays, or applies the request and then resets (a lost response: the
client retries a write that already happened).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

from conftest import write_probe
from gradlake.lake.store import LakeStore
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
from gradlake.tasks.gradients.extract import extract_shard, finalize_task
from gradlake.tasks.common.model import ModelSpec
from s3proxy import FaultyS3Proxy

N = 8
# One tensor of each kind (embedding, attention, MLP, norm, head): arrays of one chunk column and of several.
LAYERS = ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
          "model.layers.1.post_attention_layernorm.weight", "lm_head.weight"]
KINDS = ("503", "reset", "delay", "lost")


def extract(lake: str, model_dir) -> str:
    """Plan, create, compute every shard and finalize, as the flow does (without Prefect); returns the group path."""
    spec = ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint="checkpoint-1"), dataset="probe", layers=LAYERS,
                          shard_size=4, batch_size=2, max_length=256, lake=lake)
    write_probe(lake, N)
    group = create_group(plan_extraction(spec))
    for shard in group.pending_shards(spec.shard_size):
        extract_shard(spec, group, shard, log=lambda *_: None)
    finalize_task.fn(lake, [group.path])
    return group.path


def without_times(value):
    """Attrs with every timestamp left out (they say when a group was made, not what it holds)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "created_at"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def contents(lake: str, path: str) -> tuple[dict, dict[str, tuple[np.ndarray, dict]]]:
    """A group's attrs and each array's values and attrs, read back with zarr through a clean connection."""
    group = zarr.open_group(LakeStore(lake).zarr_store, path=path, mode="r", zarr_format=3)
    arrays = {name: (array[...], without_times(dict(array.attrs))) for name, array in group.arrays()}
    return without_times(dict(group.attrs)), arrays


def test_extraction_under_s3_faults_equals_clean_run(tiny_models, s3_endpoint, monkeypatch):
    faulty = FaultyS3Proxy(s3_endpoint, seed=7, fail=0.15, kinds=KINDS, delay=(0.01, 0.1))
    with FaultyS3Proxy(s3_endpoint, fail=0) as clean, faulty:
        monkeypatch.setenv("GRADLAKE_S3_ENDPOINT_URL", clean.endpoint)
        path = extract("s3://lake/faults-clean", tiny_models["olmo2"])
        monkeypatch.setenv("GRADLAKE_S3_ENDPOINT_URL", faulty.endpoint)
        assert extract("s3://lake/faults-injected", tiny_models["olmo2"]) == path

    # The proxy did fail requests, of every kind (seeded; which requests fail is the same from run to run
    # up to the few requests whose number depends on timing, such as re-reads of the completion flags).
    assert faulty.stats["requests"] > 200, faulty.stats
    assert all(faulty.stats[kind] >= 3 for kind in KINDS), faulty.stats
    assert not clean.stats.keys() & set(KINDS)

    # On a clean connection every chunk of every gradient is written exactly once ...
    chunk = re.compile(rf"^lake/faults-(clean|injected)/{re.escape(path)}/(model|lm_head)\.[^/]+/c/\d+/\d+$")
    written = {k: n for k, n in clean.puts.items() if chunk.match(k)}
    assert written and set(written.values()) == {1}, {k: n for k, n in written.items() if n != 1}
    # ... and under faults every chunk is written, and again only where the answer to a write was lost.
    faulty_written = {k.replace("faults-injected", "faults-clean"): n for k, n in faulty.puts.items() if chunk.match(k)}
    assert faulty_written.keys() == written.keys()
    assert sum(n - 1 for n in faulty_written.values()) <= faulty.stats["lost"]

    monkeypatch.setenv("GRADLAKE_S3_ENDPOINT_URL", s3_endpoint)
    attrs, arrays = contents("s3://lake/faults-clean", path)
    attrs_faulty, arrays_faulty = contents("s3://lake/faults-injected", path)
    assert attrs_faulty == attrs and attrs["gradlake"]["complete"]
    assert arrays_faulty.keys() == arrays.keys() and "lm_head.weight" in arrays
    for name, (values, array_attrs) in arrays.items():
        assert array_attrs == arrays_faulty[name][1], name
        assert values.dtype == arrays_faulty[name][0].dtype, name
        assert np.array_equal(values, arrays_faulty[name][0]), f"{name} differs after faults"
    assert arrays["shard_complete"][0].all()


def test_proxy_passes_s3_answers_through(s3_endpoint):
    """Without faults the proxy is invisible: same status codes, ETags, lengths, ranges and errors as moto's own."""
    import io

    import boto3
    from botocore.exceptions import ClientError

    with FaultyS3Proxy(s3_endpoint, fail=0) as proxy:
        direct, proxied = (boto3.client("s3", endpoint_url=url, region_name="us-east-1")
                           for url in (s3_endpoint, proxy.endpoint))
        body = bytes(range(256)) * 1000
        put = proxied.put_object(Bucket="lake", Key="proxy/a", Body=body)
        assert put["ETag"] == direct.head_object(Bucket="lake", Key="proxy/a")["ETag"]
        head = proxied.head_object(Bucket="lake", Key="proxy/a")
        assert head["ContentLength"] == len(body) and head["ETag"] == put["ETag"]
        assert proxied.get_object(Bucket="lake", Key="proxy/a")["Body"].read() == body
        part = proxied.get_object(Bucket="lake", Key="proxy/a", Range="bytes=10-19")
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206 and part["Body"].read() == body[10:20]
        proxied.put_object(Bucket="lake", Key="proxy/stream", Body=io.BytesIO(body))  # a streamed (file) body
        assert direct.get_object(Bucket="lake", Key="proxy/stream")["Body"].read() == body
        for call, code in [(lambda: proxied.head_object(Bucket="lake", Key="proxy/none"), "404"),
                           (lambda: proxied.get_object(Bucket="lake", Key="proxy/none"), "NoSuchKey"),
                           (lambda: proxied.put_object(Bucket="lake", Key="proxy/a", Body=b"x", IfNoneMatch="*"),
                            "PreconditionFailed")]:
            with pytest.raises(ClientError) as failed:
                call()
            assert failed.value.response["Error"]["Code"] == code
        keys = [o["Key"] for o in proxied.list_objects_v2(Bucket="lake", Prefix="proxy/")["Contents"]]
        assert keys == ["proxy/a", "proxy/stream"]
        proxied.delete_object(Bucket="lake", Key="proxy/stream")
        assert proxy.puts == {"lake/proxy/a": 1, "lake/proxy/stream": 1} and not proxy.stats.keys() & set(KINDS)


def test_create_if_absent_whose_answer_was_lost_finds_its_own_object(s3_endpoint, monkeypatch):
    """What a create-if-absent marker must expect: the write is applied, its answer lost, and the resent
    request (aiohttp resends a PUT once by itself) meets its own object: s3fs raises FileExistsError."""
    with FaultyS3Proxy(s3_endpoint, fail=0) as proxy:
        monkeypatch.setenv("GRADLAKE_S3_ENDPOINT_URL", proxy.endpoint)
        store = LakeStore("s3://lake/faults-marker")
        proxy.planned.append("lost")
        with pytest.raises(FileExistsError):
            store.fs.pipe_file(store.path("marker"), b"token-1", mode="create")
        assert proxy.stats["lost"] == 1 and proxy.puts == {"lake/faults-marker/marker": 1}
        assert store.fs.cat_file(store.path("marker")) == b"token-1"  # so: write a unique token, read it back
