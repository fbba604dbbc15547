"""Lake writes overlapped with compute against writes in the batch loop, side by side in one run.

Extracts every gradient of a small OLMo-2 (about 5M parameters, 21 MB per sample in
float32) for the first probe samples into an S3 lake served by moto in a process of its
own (as MinIO would be), into the same server behind a proxy that delays every request by
50 ms (an object store across a network), and into a local directory; each round runs the extraction with
its writes on a thread of their own (`lake.overlap`, as gradlake runs) and with the same
writes done synchronously, one after the other.  Prints the median wall times, their
ratio, and how busy the writes kept their thread.

    python benchmarks/overlap.py                    # 32 samples, 3 rounds
    python benchmarks/overlap.py --samples 64 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from moto_s3 import moto_server  # benchmarks/moto_s3.py


def latency_proxy(upstream: str, seconds: float) -> tuple[subprocess.Popen, str]:
    """The suite's S3 proxy (tests/s3proxy.py) in a process of its own, delaying every request by `seconds`:
    a lake far away, as an object store across a network is."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from s3proxy import FaultyS3Proxy; "
            "p = FaultyS3Proxy(sys.argv[2], fail=1.0, kinds=('delay',), delay=(float(sys.argv[3]),) * 2).start(); "
            "print(p.endpoint, flush=True); time.sleep(1e9)")
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    proc = subprocess.Popen([sys.executable, "-c", code, tests, upstream, str(seconds)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def small_model(where: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.data.probes import load_probe_set, probe_variant
    from gradlake.tasks.training.tiny import tiny_config, train_tokenizer

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
    from gradlake.tasks.gradients import extract, plan

    busy = []

    class Counted(BackgroundWrites):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            busy.append(self.busy_s)

    extract.BackgroundWrites = partial(Counted, depth)
    try:
        began = time.perf_counter()
        group = plan.create_group(plan.plan_extraction(spec))
        for shard in extract.pending_shards(spec, group):
            extract.extract_shard(spec, group, shard, log=lambda *_: None)
        return time.perf_counter() - began, sum(busy)
    finally:
        extract.BackgroundWrites = BackgroundWrites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-budget", type=int, default=4096, help="as the extraction's; 0: batches in dataset order")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds each request to the far S3 waits")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gradlake.tasks.gradients.plan import ExtractionSpec
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.data.probes import store_probe_set

    proc, endpoint = moto_server()
    proxy, far = latency_proxy(endpoint, args.latency)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    places = {"s3": endpoint, f"s3 +{args.latency * 1000:.0f}ms": far, "local": None}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model = small_model(Path(scratch) / "model")
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for r in range(args.rounds):
                for p, (where, url) in enumerate(places.items()):
                    for how, depth in (("overlapped", 1), ("in the loop", 0)):
                        if url:
                            os.environ["GRADLAKE_S3_ENDPOINT_URL"] = url
                        lake = f"s3://lake/r{r}-{p}-{depth}" if url else f"file://{scratch}/lake-r{r}-{depth}"
                        store_probe_set(lake, "probe", args.samples)
                        spec = ExtractionSpec(model=ModelSpec(model=str(model)), lake=lake, shard_size=args.samples,
                                              batch_size=8, max_length=512, token_budget=args.token_budget or None)
                        results.setdefault((where, how), []).append(extract_once(spec, depth))
    finally:
        proxy.terminate()
        proc.terminate()
    print(f"{args.samples} probe samples, every gradient of a 5M-parameter OLMo-2 stored in float32; "
          f"median of {args.rounds} interleaved rounds, one torch thread")
    for where in places:
        walls = {how: statistics.median(w for w, _ in results[(where, how)]) for how in ("overlapped", "in the loop")}
        busy = {how: statistics.median(b for _, b in results[(where, how)]) for how in ("overlapped", "in the loop")}
        print(f"  {where:10s}: overlapped {walls['overlapped']:6.1f}s (writes busy {busy['overlapped']:5.1f}s), "
              f"writes in the loop {walls['in the loop']:6.1f}s (writes {busy['in the loop']:5.1f}s): "
              f"in-the-loop / overlapped = {walls['in the loop'] / walls['overlapped']:.2f}x")


if __name__ == "__main__":
    main()
