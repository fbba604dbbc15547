"""Lake writes overlapped with compute against writes in the batch loop, side by side in one run.

Extracts every gradient of a small OLMo-2 (about 5M parameters, 21 MB per sample in
float32) for the first probe samples into an S3 lake served by moto in a process of its
own (as MinIO would be), and into a local directory; each round runs the extraction with
its writes on a thread of their own (`lake.overlap`, as gradlake runs) and with the same
writes done synchronously, one after the other.  Prints the median wall times, their
ratio, and how busy the writes kept their thread.

    python benchmarks/overlap.py                    # 32 samples, 3 rounds
    python benchmarks/overlap.py --samples 64 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


def moto_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on a free loopback port, with a bucket 'lake'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="lake")
            return proc, endpoint
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's S3 server did not start")


def small_model(where: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.probes import load_probe_set, probe_variant
    from gradlake.tasks.tiny import tiny_config, train_tokenizer

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer((m["content"] for chat in chats for m in chat), vocab_size=2048)
    config = tiny_config("olmo2", tokenizer, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def extract_once(spec, depth: int) -> tuple[float, float]:
    """Wall seconds of one whole extraction, and the seconds its writes took."""
    from gradlake.lake.overlap import BackgroundWrites
    from gradlake.tasks import extract

    busy = []

    class Counted(BackgroundWrites):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            busy.append(self.busy_s)

    extract.BackgroundWrites = partial(Counted, depth)
    try:
        began = time.perf_counter()
        group = extract.create_group(extract.plan_extraction(spec))
        for shard in extract.pending_shards(spec, group):
            extract.extract_shard(spec, group, shard, log=lambda *_: None)
        return time.perf_counter() - began, sum(busy)
    finally:
        extract.BackgroundWrites = BackgroundWrites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gradlake.tasks.extract import ExtractionSpec
    from gradlake.tasks.model import ModelSpec
    from gradlake.tasks.probes import store_probe_set

    proc, endpoint = moto_server()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      GRADLAKE_S3_ENDPOINT_URL=endpoint)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model = small_model(Path(scratch) / "model")
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for r in range(args.rounds):
                for where in ("s3", "local"):
                    for how, depth in (("overlapped", 1), ("in the loop", 0)):
                        lake = (f"s3://lake/r{r}-{depth}" if where == "s3" else f"file://{scratch}/lake-r{r}-{depth}")
                        store_probe_set(lake, "probe", args.samples)
                        spec = ExtractionSpec(model=ModelSpec(model=str(model)), lake=lake, shard_size=args.samples,
                                              batch_size=8, max_length=512)
                        results.setdefault((where, how), []).append(extract_once(spec, depth))
    finally:
        proc.terminate()
    print(f"{args.samples} probe samples, every gradient of a 5M-parameter OLMo-2 stored in float32; "
          f"median of {args.rounds} interleaved rounds, one torch thread")
    for where in ("s3", "local"):
        walls = {how: statistics.median(w for w, _ in results[(where, how)]) for how in ("overlapped", "in the loop")}
        busy = {how: statistics.median(b for _, b in results[(where, how)]) for how in ("overlapped", "in the loop")}
        print(f"  {where:5s}: overlapped {walls['overlapped']:6.1f}s (writes busy {busy['overlapped']:5.1f}s), "
              f"writes in the loop {walls['in the loop']:6.1f}s (writes {busy['in the loop']:5.1f}s): "
              f"in-the-loop / overlapped = {walls['in the loop'] / walls['overlapped']:.2f}x")


if __name__ == "__main__":
    main()
