"""The extraction and projection examples of docs/gradients.md and docs/projections.md at the real models' shapes, on this machine.

Builds AMD-OLMo-1B's shape (random bfloat16 weights, ~2.4 GB on disk) and OLMo-2-1124-7B's
(its config alone: nothing is loaded unless an example gets past planning), stores the
first few probe samples in a scratch lake per example, and runs each command as written, with
the preset replaced by the local directory and shards sized to the few samples.  Each
example either runs, reported with its wall time and the peak memory of its process, or is
refused at plan time, reported with the refusal (which states the estimated cost).

    python benchmarks/readme_shapes.py                 # 4 samples, scratch in ./build/readme-shapes
    python benchmarks/readme_shapes.py --samples 2 --only 1b-store
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# Published configs (config.json of amd/AMD-OLMo-1B-SFT and allenai/OLMo-2-1124-7B-SFT).
SHAPES = {
    "amd-olmo-1b": ("olmo", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)),
    "olmo-2-7b": ("olmo2", dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6)),
}

# (name, shape, arguments after `gradlake`): those guides' commands, the model and lake filled in.
EXAMPLES = [
    ("1b-store", "amd-olmo-1b", "extract --dataset probe --variant paraphrased --paradigm sft "
     "--layers 'model.layers.*.mlp.down_proj.weight' --mode store --shard-size {n} --batch-size 2 --dtype bfloat16"),
    ("1b-store-bf16", "amd-olmo-1b", "extract --dataset probe --variant original --paradigm sft "
     "--layers 'model.layers.*.mlp.down_proj.weight' --mode store --shard-size {n} --batch-size 2 --dtype bfloat16 "
     "--store-dtype bfloat16"),
    ("1b-mean", "amd-olmo-1b", "extract --dataset probe --variant original --paradigm sft --mode mean_normalized "
     "--layers 'model.layers.*.mlp.down_proj.weight' "
     "--shard-size {n} --batch-size 2 --dtype bfloat16"),
    ("1b-project-dense", "amd-olmo-1b", "extract --dataset probe --variant paraphrased --dtype bfloat16 "
     "--layers 'model.layers.*.mlp.*_proj.weight' --no-keep-gradients --project rademacher:flat:8192 "
     "--project kronecker:64x64 --shard-size {n} --batch-size 2"),
    ("1b-project-kron-sparse", "amd-olmo-1b", "extract --dataset probe --variant paraphrased --dtype bfloat16 "
     "--layers 'model.layers.*.mlp.*_proj.weight' --no-keep-gradients --project sparse:flat:8192 "
     "--project kronecker:64x64 --shard-size {n} --batch-size 2"),
    ("1b-project-after", "amd-olmo-1b", "project --gradients {stored} --kind rademacher --scope proportional --dim 16384 --seed 0"),
    ("7b-project-dense", "olmo-2-7b", "extract --dataset probe --variant paraphrased --dtype bfloat16 "
     "--layers 'model.layers.*.mlp.*_proj.weight' --no-keep-gradients --project rademacher:flat:8192 "
     "--project kronecker:64x64 --shard-size {n} --batch-size 2"),
]


def build(shape: str, root: Path, with_weights: bool) -> Path:
    """A local model directory of the shape: config, a tokenizer trained on the probe set, random weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.data.probes import load_probe_set, probe_variant
    from gradlake.tasks.training.tiny import tiny_config, train_tokenizer

    where = root / shape
    if (where / "config.json").exists() and (not with_weights or any(where.glob("*.safetensors"))):
        return where
    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer((m["content"] for chat in chats for m in chat), vocab_size=2048)
    arch, sizes = SHAPES[shape]
    # The real embedding size (the small tokenizer uses only its first ids), its special ids from the tokenizer.
    config = tiny_config(arch, tokenizer, **{k: v for k, v in sizes.items() if k != "vocab_size"})
    config.vocab_size = sizes["vocab_size"]
    config.torch_dtype = "bfloat16"
    where.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(where)
    if with_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(where)
    else:
        config.save_pretrained(where)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--scratch", default="build/readme-shapes")
    parser.add_argument("--timeout", type=float, default=900, help="seconds an example may run before it is stopped")
    parser.add_argument("--only", action="append", default=[], help="run only these examples (repeatable)")
    args = parser.parse_args()

    from gradlake.tasks.data.probes import store_probe_set

    root = Path(args.scratch).resolve()
    shutil.rmtree(root / "lakes", ignore_errors=True)  # every example computes afresh
    lakes: dict[str, str] = {}  # one lake per example (two examples with other layers on one variant would clash)
    gradlake = str(Path(sys.executable).with_name("gradlake"))
    stored = None
    rows = []
    for name, shape, command in EXAMPLES:
        if args.only and name not in args.only:
            continue
        model = build(shape, root / "models", with_weights=shape == "amd-olmo-1b")
        if "{stored}" in command:
            if stored is None:
                rows.append((name, "skipped", "needs 1b-store first", 0.0, 0.0))
                continue
        text = command.format(n=args.samples, stored=stored)
        argv = [gradlake, *shlex.split(text)]
        if argv[1] == "extract":
            argv += ["--model", str(model)]
        lake = lakes["1b-store"] if "{stored}" in command else f"file://{root / 'lakes' / name}"
        if lake not in lakes.values():
            store_probe_set(lake, "probe", args.samples)
        lakes[name] = lake
        argv += ["--lake", lake]
        began = time.perf_counter()
        log = root / f"{name}.log"
        with open(log, "w") as sink:
            child = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
            timer = threading.Timer(args.timeout, child.kill)  # what cannot finish here is reported as such
            timer.start()
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
            timer.cancel()
        wall = time.perf_counter() - began
        peak = usage.ru_maxrss / 2**20  # GiB (ru_maxrss is in KiB)
        returncode = os.waitstatus_to_exitcode(status)
        out = log.read_text().strip().splitlines()
        if returncode == -9:
            rows.append((name, "killed at timeout", f"still running after {args.timeout:.0f}s; log in {log}", wall, peak))
        elif returncode == 0:
            if name == "1b-store":
                stored = next(line.split(f"{lake}/", 1)[1] for line in out if line.startswith("gradients:"))
            rows.append((name, "ran", out[-1][:160] if out else "", wall, peak))
        else:
            error = next((line for line in reversed(out) if line.startswith("error")), out[-1] if out else "")
            rows.append((name, f"refused (rc {returncode})", error[:400], wall, peak))
        print(f"{name}: {rows[-1][1]} in {wall:.0f}s, peak RSS {peak:.1f} GiB\n    {rows[-1][2]}", flush=True)
    print(f"\n{args.samples} probe samples; CPU, {os.cpu_count()} cores; logs in {root}")
    for name, status, detail, wall, peak in rows:
        print(f"  {name:24s} {status:18s} {wall:7.0f}s  {peak:5.1f} GiB")


if __name__ == "__main__":
    main()
