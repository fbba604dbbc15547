"""A row-chunk's arrays written together, and lake writes on a thread of their own, each against the
same extraction without it, side by side in one run.

Extracts every gradient of a small OLMo-2 (about 5M parameters, 21 MB per sample in
float32) for the first probe samples into an S3 lake served by moto in a process of its
own (as MinIO would be), into the same server behind tests/s3proxy.py adding 50 ms to every
request (an object store across a network), and into a local directory.  Each round runs, in
an order rotated from round to round, three setups:

- ``together``: as gradlake writes (every array's objects of a row-chunk put in one batch,
  `lake.chunk_objects`, on the writer thread of `lake.overlap` while the next batch is computed);
- ``one array at a time``: the same, but a row-chunk's arrays put one after another (each
  array's objects still in flight together);
- ``in the loop``: every array together, but written synchronously in the batch loop.

Prints, per place, the median wall and CPU seconds (this process, every thread) of each setup,
how busy the writes kept their thread, and each setup / ``together`` as the median of the
per-round ratios with their min-max.

    python benchmarks/overlap.py                    # 32 samples, 3 rounds
    python benchmarks/overlap.py --samples 64 --rounds 5 --places s3+latency
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from itertools import groupby
from pathlib import Path

import torch

from moto_s3 import latency_proxy, moto_server  # benchmarks/moto_s3.py

SETUPS = ("together", "one array at a time", "in the loop")


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


def one_array_at_a_time(put_objects):
    """`put_objects` putting a row-chunk's objects one array after another: the writes before arrays went together."""

    def put(fs, objects, threads, **kwargs):
        for _, same_array in groupby(objects, key=lambda o: o[0].rsplit("/c/", 1)[0]):
            put_objects(fs, list(same_array), threads, **kwargs)

    return put


def extract_once(spec, setup: str) -> tuple[float, float, float]:
    """Wall and CPU seconds of one whole extraction in `setup`, and the seconds its writes took."""
    from gradlake.lake import gradients
    from gradlake.lake.overlap import BackgroundWrites
    from gradlake.tasks.gradients import extract, plan

    busy = []

    class Counted(BackgroundWrites):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            busy.append(self.busy_s)

    put_objects = gradients.put_objects
    extract.BackgroundWrites = partial(Counted, 0 if setup == "in the loop" else 1)
    if setup == "one array at a time":
        gradients.put_objects = one_array_at_a_time(put_objects)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        group = plan.create_group(plan.plan_extraction(spec))
        for shard in extract.pending_shards(spec, group):
            extract.extract_shard(spec, group, shard, log=lambda *_: None)
        return time.perf_counter() - wall, time.process_time() - cpu, sum(busy)
    finally:
        extract.BackgroundWrites = BackgroundWrites
        gradients.put_objects = put_objects


def spread(values: list[float]) -> str:
    """Median and min-max."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-budget", type=int, default=4096, help="as the extraction's; 0: batches in dataset order")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds each request to the far S3 waits")
    parser.add_argument("--places", default="s3,s3+latency,local", help="some of s3, s3+latency, local")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gradlake.lake.store import LakeStore
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.data.probes import store_probe_set
    from gradlake.tasks.gradients.plan import ExtractionSpec

    proc, endpoint = moto_server()
    proxy, far = latency_proxy(endpoint, args.latency * 1000)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    known = {"s3": ("s3", endpoint), "s3+latency": (f"s3 +{args.latency * 1000:.0f}ms", far), "local": ("local", None)}
    places = dict(known[p] for p in args.places.split(","))
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model = small_model(Path(scratch) / "model")
            for r in range(args.rounds):
                setups = SETUPS[r % len(SETUPS):] + SETUPS[:r % len(SETUPS)]
                for p, (where, url) in enumerate(places.items()):
                    for s, setup in enumerate(setups):
                        if url:
                            os.environ["GRADLAKE_S3_ENDPOINT_URL"] = url
                        lake = f"s3://lake/r{r}-{p}-{s}" if url else f"file://{scratch}/lake-r{r}-{s}"
                        store_probe_set(lake, "probe", args.samples)
                        spec = ExtractionSpec(model=ModelSpec(model=str(model)), lake=lake, shard_size=args.samples,
                                              batch_size=8, max_length=512, token_budget=args.token_budget or None)
                        results.setdefault((where, setup), []).append(extract_once(spec, setup))
                        store = LakeStore(lake)  # each lake removed once timed: moto spills large objects to disk
                        store.fs.rm(store.path(""), recursive=True)
    finally:
        proxy.terminate()
        proc.terminate()
    print(f"{args.samples} probe samples, every gradient of a 5M-parameter OLMo-2 stored in float32; "
          f"{args.rounds} interleaved rounds (order rotated), one torch thread; medians, ratios as the median of "
          "the per-round ratios (min-max)")
    for where in places:
        print(f"  {where}:")
        for setup in SETUPS:
            runs = results[(where, setup)]
            line = (f"    {setup:20s} wall {statistics.median(w for w, _, _ in runs):6.1f} s, "
                    f"CPU {statistics.median(c for _, c, _ in runs):6.1f} s, writes busy "
                    f"{statistics.median(b for *_, b in runs):5.1f} s")
            if setup != "together":
                base = results[(where, "together")]
                line += (f"; / together: wall {spread([a[0] / b[0] for a, b in zip(runs, base)])}, "
                         f"CPU {spread([a[1] / b[1] for a, b in zip(runs, base)])}")
            print(line)


if __name__ == "__main__":
    main()
