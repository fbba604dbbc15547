"""Model tracing at AMD-OLMo-1B's shape on this machine (random bfloat16 weights, CPU), and how the assignment grows.

Prints, measured in one run:

- the Hungarian assignment (scipy's linear_sum_assignment on a dense similarity matrix) at
  sizes 256 .. 4096, each size's time over the previous one's (8 would be cubic growth);
- at the 1B shape (hidden 2048, MLP 8192, 16 layers, vocabulary 50304): the residual
  alignment, one layer's MLP alignment (all 16 extrapolated unless --full), one draw of the
  permutation test's null (every tensor permuted and compared), and one point of the
  mode-connectivity path (all weights interpolated, then the loss of the probe samples),
  each also as a ratio to one forward pass of those samples.

    python benchmarks/tracing.py                # about 10 minutes on 2 cores
    python benchmarks/tracing.py --full         # all 16 MLP layers aligned
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

SHAPE = dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="align all 16 MLP layers instead of one")
    parser.add_argument("--samples", type=int, default=4, help="probe samples in the loss of one path point")
    parser.add_argument("--sizes", default="256,512,1024,2048,4096", help="assignment sizes")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from gradlake.tasks.common.loss import encode_sample, pad_batch
    from gradlake.tasks.data.probes import load_probe_set, probe_variant
    from gradlake.tasks.training.tiny import tiny_config, train_tokenizer
    from gradlake.tasks.tracing.permutation import align_hidden, align_mlp, assignment, decoder_layers, random_permutation
    from gradlake.tasks.tracing.connectivity import loss_path, token_loss
    from gradlake.tasks.tracing.statistics import mean_weight_cosine

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("assignment (dense n x n similarity, scipy linear_sum_assignment):")
    previous = None
    rng = np.random.default_rng(0)
    assignment(torch.from_numpy(rng.standard_normal((8, 8))))  # scipy's import and first call, not timed
    for n in [int(s) for s in args.sizes.split(",")]:
        sim = torch.from_numpy(rng.standard_normal((n, n)))
        seconds, _ = timed(assignment, sim)
        ratio = "" if previous is None else f"  x{seconds / previous:.1f} the previous size"
        print(f"  n={n:5d}: {seconds:8.3f} s{ratio}")
        previous = seconds

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer((m["content"] for chat in chats for m in chat), vocab_size=2048)
    config = tiny_config("olmo", tokenizer, **{k: v for k, v in SHAPE.items() if k != "vocab_size"})
    config.vocab_size = SHAPE["vocab_size"]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval())
    base, candidate = models
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\nAMD-OLMo-1B shape: {n_params / 1e9:.2f}B parameters in bfloat16, two models with random weights")
    encoded = [encode_sample(tokenizer, chat, "sft", 512) for chat in chats[: args.samples]]
    batches = [pad_batch(encoded, tokenizer.pad_token_id)]
    tokens = sum(len(e.input_ids) for e in encoded)

    forward, _ = timed(token_loss, base, batches)
    hidden_s, hidden = timed(align_hidden, base, candidate)
    layers = decoder_layers(base) if args.full else decoder_layers(base)[:1]

    def align_layers():
        for lb, lc in zip(layers, decoder_layers(candidate)):
            align_mlp(lb, lc, hidden)

    mlp_s, _ = timed(align_layers)
    per_layer = mlp_s / len(layers)
    all_layers = per_layer * len(decoder_layers(base))
    null_s, _ = timed(mean_weight_cosine, base, candidate, random_permutation(candidate, 1))
    point_s, _ = timed(loss_path, base, copy.deepcopy(candidate), batches, 2)
    point_s /= 2

    print(f"  one forward pass ({args.samples} samples, {tokens} tokens): {forward:.2f} s")
    print(f"  residual alignment (2048 x 2048 over 50304 tokens):  {hidden_s:8.2f} s  = {hidden_s / forward:6.1f} forwards")
    print(f"  MLP alignment, one layer (8192 x 8192):              {per_layer:8.2f} s  = {per_layer / forward:6.1f} forwards")
    print(f"  MLP alignment, 16 layers ({'measured' if args.full else 'extrapolated'}):              "
          f"{all_layers:8.2f} s  = {all_layers / forward:6.1f} forwards")
    print(f"  one null draw of the cos test (permute + compare):    {null_s:8.2f} s  = {null_s / forward:6.1f} forwards"
          f"  (100 permutations: {100 * null_s / 60:.1f} min)")
    print(f"  one point of the loss path (interpolate + loss):     {point_s:8.2f} s  = {point_s / forward:6.1f} forwards"
          f"  (11 points: {11 * point_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
