"""The north star priced: a whole SFT mixture through a 7B model's per-sample gradients, in GPU-hours and lake bytes.

The cost model (docs/performance.md) counts, per sample of T tokens through a model whose matrix
weights hold P values (every `nn.Linear`, the output layer included; the input embedding is a
lookup and costs no multiply):

- forward: 2·P·T FLOPs, plus attention's 4·T²·d per layer (scores and the weighted sum);
- backward to every activation: the same again (2·P·T + 4·T²·d per layer, twice for the scores);
- per-sample gradients kept whole: each kept weight's gradient, 2·out·in·T, as a training step's
  weight gradients cost; so extraction of everything costs what a training step costs, 6·P·T;
- on-the-fly kronecker k_out x k_in instead (nothing formed): per token and tensor
  2·(out·k_out + in·k_in), per sample 2·T·k_out·k_in; no weight gradient at all, so about 4·P·T.

GPU-hours are these FLOPs over a fraction of the device's bf16 dense peak, printed at several
fractions (assumed); given `benchmarks/gpu.py`'s JSON (--measured), the tokens/s it measured for
kronecker at this shape price the run directly as well.

Lake bytes: each sample's projected values (k_out·k_in per projected tensor) in the stored dtype,
plus its tokens (int32 ids and a one-byte label mask at the padded width).

    python benchmarks/north_star.py                              # Tulu-3 SFT mixture, OLMo-2-7B, kronecker:64x64
    python benchmarks/north_star.py --layers 'model.layers.*.mlp.*_proj.weight' --kronecker 16x16
    python benchmarks/north_star.py --measured build/gpu-bench.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

# Published configs (config.json of the models): the shapes benchmarks/readme_shapes.py builds too.
from readme_shapes import SHAPES

TULU3_SFT_SAMPLES = 939_344  # allenai/tulu-3-sft-mixture, train split
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity
STORE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def matrix_shapes(shape: str) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Every weight's shape for a published config, built on the meta device (nothing allocated), and the config."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.training.tiny import tiny_config

    arch, sizes = SHAPES[shape]
    config = tiny_config(arch, sizes["vocab_size"], **{k: v for k, v in sizes.items() if k != "vocab_size"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}, config.to_dict()


def price(shapes: dict[str, tuple[int, ...]], config: dict, layers: str, kronecker: tuple[int, int], tokens: int,
          samples: int, store_dtype: str) -> dict:
    """FLOPs per sample (whole gradients and kronecker on the fly), and lake bytes, from the shapes alone."""
    matrices = {n: s for n, s in shapes.items() if len(s) == 2 and "embed_tokens" not in n}
    projected = {n: s for n, s in matrices.items() if fnmatch.fnmatchcase(n, layers)}
    if not projected:
        raise SystemExit(f"--layers {layers!r} matches no 2-D weight; e.g. 'model.layers.*.mlp.*_proj.weight'")
    p = sum(o * i for o, i in matrices.values())
    d, n_layers = config["hidden_size"], config["num_hidden_layers"]
    attention = 4 * tokens * tokens * d * n_layers  # forward; the backward costs twice that
    forward = 2 * p * tokens + attention
    activations_backward = 2 * p * tokens + 2 * attention
    k_out, k_in = kronecker
    kron = sum(2 * tokens * (o * k_out + i * k_in) + 2 * tokens * k_out * k_in for o, i in projected.values())
    values = len(projected) * k_out * k_in
    per_sample_bytes = values * STORE_BYTES[store_dtype] + tokens * (4 + 1)
    return {
        "matrix_parameters": p, "all_parameters": sum(_numel(s) for s in shapes.values()),
        "projected_tensors": len(projected), "values_per_sample": values,
        "flops_training_step": forward + activations_backward + 2 * p * tokens,
        "flops_kronecker_on_the_fly": forward + activations_backward + kron,
        "lake_bytes_per_sample": per_sample_bytes, "lake_bytes": per_sample_bytes * samples,
    }


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="olmo-2-7b")
    parser.add_argument("--samples", type=int, default=TULU3_SFT_SAMPLES)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", default="model.layers.*", help="glob over weight names: the projected tensors")
    parser.add_argument("--kronecker", default="64x64", help="KOUTxKIN")
    parser.add_argument("--store-dtype", choices=sorted(STORE_BYTES), default="float32")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16), default="H100 SXM")
    parser.add_argument("--measured", type=Path, help="benchmarks/gpu.py's JSON: its kronecker tokens/s at this shape price the run too")
    args = parser.parse_args()
    try:
        kronecker = tuple(int(x) for x in args.kronecker.lower().split("x"))
        assert len(kronecker) == 2 and min(kronecker) > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"--kronecker {args.kronecker!r} is not KOUTxKIN with positive sizes, e.g. 64x64") from None

    shapes, config = matrix_shapes(args.shape)
    cost = price(shapes, config, args.layers, kronecker, args.tokens, args.samples, args.store_dtype)
    peak = PEAK_BF16[args.gpu]
    fractions, source, rates = [0.25, 0.40, 0.55], "assumed (no GPU measurement given)", []
    if args.measured:
        runs = json.loads(args.measured.read_text())
        rates = [c for c in runs.get("cases", []) if c.get("status") == "ran" and c.get("shape") == args.shape
                 and str(c.get("method", "")).startswith("kronecker")]
        if not rates:
            raise SystemExit(f"{args.measured} holds no kronecker case that ran at shape {args.shape}")
        source = f"measured by benchmarks/gpu.py on {runs['device']['name']}"

    print(f"{args.shape}: {cost['matrix_parameters'] / 1e9:.2f}B matrix weights ({cost['all_parameters'] / 1e9:.2f}B in all), "
          f"{args.samples:,} samples x {args.tokens} tokens, kronecker {args.kronecker} on {cost['projected_tensors']} tensors "
          f"({args.layers}), stored {args.store_dtype}")
    print(f"FLOPs per sample: training step {cost['flops_training_step']:.3g}, kronecker on the fly "
          f"{cost['flops_kronecker_on_the_fly']:.3g} ({cost['flops_kronecker_on_the_fly'] / cost['flops_training_step']:.2f}x a step)")
    total = cost["flops_kronecker_on_the_fly"] * args.samples
    print(f"\n{args.gpu} bf16 dense peak {peak / 1e12:.0f} TFLOP/s; fraction of peak {source}")
    print("| fraction of peak | GPU-hours | samples/s per GPU |\n|---:|---:|---:|")
    for f in fractions:
        seconds = total / (f * peak)
        print(f"| {f:.2f} | {seconds / 3600:,.1f} | {args.samples / seconds:,.1f} |")
    for case in rates:  # the measured rate itself, with no FLOP model in between
        seconds = args.samples * args.tokens / case["tokens_per_s"]
        print(f"| {case['method']}: {case['tokens_per_s']:,.0f} tokens/s measured | {seconds / 3600:,.1f} | "
              f"{args.samples / seconds:,.1f} |")
    print(f"\nlake: {cost['values_per_sample']:,} values per sample, {cost['lake_bytes_per_sample'] / 1e6:.2f} MB per sample "
          f"(tokens included), {cost['lake_bytes'] / 1e12:.2f} TB in all")


if __name__ == "__main__":
    main()
