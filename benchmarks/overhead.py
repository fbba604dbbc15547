"""What the extraction function adds to its kernel, by what it writes: whole gradients, or projections made on the fly.

The probe set's first N chats (sft loss) through peers.py's 5.25M OLMo-2, one CPU thread. For each
setting, in interleaved rounds (the order alternating), CPU time of this process for:

- the kernel: `PerSampleGradients` over the batches extraction makes (per 64-sample shard, sorted
  and packed), outputs left in its buffers;
- the extraction function: `extract_shard` over every shard of a freshly created local group
  (planning and creation untimed, as the flow does them once per run), lake writes included;
- for whole gradients, the same bytes written as plain files (`tobytes`, CRC32C appended, one file
  per array and row-chunk): what storing them costs at least.

Printed: each round's CPU-s and the function/kernel ratio, median and min-max over rounds.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                       # 64 samples, 3 rounds, all settings
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --samples 160 --settings store
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import google_crc32c
import numpy as np
import torch

from gradlake.tasks.common.loss import pad_batch
from gradlake.tasks.gradients.engine import PerSampleGradients, Projection
from gradlake.tasks.gradients.plan import create_group, plan_extraction
from gradlake.tasks.projection.projectors import projectors_for
from gradlake.tasks.projection.spec import output_key, parse_projection
from peers import build
from peers_lake import Extraction, extraction_batches, save_model

SETTINGS = {"store": None, "kronecker": "kronecker:16x16", "sparse": "sparse:flat:8192"}
PROJECTED_LAYERS = ["model.layers.*_proj.weight"]


def raw_writes(group, out: Path) -> float:
    """CPU-s to write the group's stored arrays' bytes as plain files, CRC32C appended, one per array and row-chunk."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    chunks = [{n: group.array(n)[group.plan.chunk_bounds(k)[0]:group.plan.chunk_bounds(k)[1]] for n in group.plan.parameters}
              for k in range(group.plan.n_chunks)]
    began = time.process_time()
    for k, arrays in enumerate(chunks):
        for i, a in enumerate(arrays.values()):
            data = a.tobytes()
            with open(out / f"{k}-{i}", "wb") as f:
                f.write(data + google_crc32c.value(data).to_bytes(4, "little"))
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {sorted(SETTINGS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoded, pad_id, model, tokenizer = build(with_tokenizer=True)
    encoded = encoded[:args.samples]
    root = Path(tempfile.mkdtemp(prefix="gradlake-overhead-"))
    model_dir = save_model(model, tokenizer, root / "model")
    lengths = np.array([len(e.input_ids) for e in encoded])
    for setting in args.settings.split(","):
        kind = SETTINGS[setting]
        extraction = Extraction(model_dir, root / setting, args.samples)

        def prepare() -> None:
            extraction.prepare()
            if kind:  # projections on the fly of the blocks' matrix weights, no gradient kept
                extraction.spec = extraction.spec.model_copy(update=dict(
                    projections=[parse_projection(kind)], keep_gradients=False, layers=PROJECTED_LAYERS))
                extraction.group = create_group(plan_extraction(extraction.spec))

        prepare()
        group = extraction.group
        layers = list(group.lineage["layers"])
        kept = list(group.plan.parameters)
        per_sample = sum(group.plan.numel(n) for n in kept) * 4 or 1
        batches = extraction_batches(lengths, extraction.spec, per_sample)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in set(layers)}
        projections = ([Projection(projectors_for(parse_projection(kind), shapes, torch.device("cpu")),
                                   key=partial(output_key, parse_projection(kind)))] if kind else [])

        def kernel() -> None:
            with PerSampleGradients(model, kept, projections, "tokens", int(lengths.max())) as grads:
                for batch in batches:
                    ids, labels = pad_batch([encoded[i] for i in batch], pad_id)
                    grads(ids, labels, torch.as_tensor(lengths[batch]))

        times: dict[str, list[float]] = {"kernel": [], "function": [], "raw writes": []}
        for r in range(args.rounds):
            for name in (["kernel", "function"] if r % 2 == 0 else ["function", "kernel"]):
                if name == "function":
                    prepare()
                began = time.process_time()
                kernel() if name == "kernel" else extraction.run()
                times[name].append(time.process_time() - began)
            if not kind:
                times["raw writes"].append(raw_writes(extraction.group, root / "raw"))
        ratios = [f / k for f, k in zip(times["function"], times["kernel"])]
        stored = args.samples * per_sample / 1e9 if not kind else 0
        print(f"{setting} ({kind or 'whole gradients, float32'}; {stored:.2f} GB stored): kernel CPU-s "
              f"{[round(t, 2) for t in times['kernel']]}, function {[round(t, 2) for t in times['function']]}"
              + (f", the same bytes as plain files {[round(t, 2) for t in times['raw writes']]}" if not kind else "")
              + f"; function/kernel {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
