"""Extraction throughput, measured side by side in one run.

By default, on fixed-length tokens, (1) gradlake's batched per-sample extraction and (2) the
seed studies' loop (one sample per backward pass, every gradient copied to CPU) beside (3) a
training step on the same tokens (summed gradients), the floor every method sits at: their
per-sample gradients are checked against each other first, then the three are timed in CPU
time, interleaved round after round with the order rotating, and each is printed as the median
and min-max of its per-round ratios to the training step, so that load from other processes
hits them alike.

``--projections`` instead prints what on-the-fly projection costs: for each projection
(gradients not kept), its time per batch over that of extracting the same tensors'
per-sample gradients with nothing projected, both measured in every round (CPU time of
this process and wall time; the medians of the per-round ratios, and the CPU ratios' spread);
with ``--probe`` a round is a pass over the 160 probe chats, packed as extraction packs them.  ``--fly`` extracts a
few batches with on-the-fly kronecker and sparse projections, gradients not kept, and
prints samples/s, the fraction of the floor and the peak RSS of each (for the
amd-olmo-1b shape, where one call takes minutes on a CPU).

    OMP_NUM_THREADS=1 python benchmarks/extraction.py --rounds 9   # small OLMo-2, 128 tokens, batch 8, CPU
    python benchmarks/extraction.py --shape amd-olmo-1b --device cuda --dtype bfloat16 --tokens 512
    OMP_NUM_THREADS=1 python benchmarks/extraction.py --projections --shape olmo2-10m --tokens 256
    OMP_NUM_THREADS=1 python benchmarks/extraction.py --projections --shape olmo2-100m --tokens 256 --batch 4
    OMP_NUM_THREADS=1 python benchmarks/extraction.py --projections --probe --kinds sparse:flat:8192,kronecker:32x32
    OMP_NUM_THREADS=1 python benchmarks/extraction.py --fly --shape amd-olmo-1b --tokens 128 --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM, OlmoConfig, OlmoForCausalLM

from gradlake.tasks.gradients.engine import PerSampleGradients, Projection
from gradlake.tasks.common.loss import sample_losses
from gradlake.tasks.projection.spec import output_key, parse_projection
from gradlake.tasks.projection.projectors import projector_choices, projectors_for

SHAPES = {
    # A small OLMo-2 of a few million parameters.
    "small-olmo2": (Olmo2Config, Olmo2ForCausalLM, dict(vocab_size=2048, hidden_size=384, intermediate_size=1024,
                                                          num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6)),
    # ~100M parameters: 12 layers of 768, MLP 2048, vocab 8192.
    "olmo2-100m": (Olmo2Config, Olmo2ForCausalLM, dict(vocab_size=8192, hidden_size=768, intermediate_size=2048,
                                                        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)),
    "small-olmo2-wide": (Olmo2Config, Olmo2ForCausalLM, dict(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                                                               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8)),
    # AMD-OLMo-1B's shapes (random weights): 16 layers, 2048 wide, MLP 8192, vocab 50304.
    "amd-olmo-1b": (OlmoConfig, OlmoForCausalLM, dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                                       num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16)),
}
SHAPES["olmo2-10m"] = SHAPES["small-olmo2"]  # 8.6M parameters
# What --projections compares; dense kinds at dimensions whose matrix fits the cache at ~10M
# parameters (at ~100M they are drawn again for every batch, which is what they cost there).
PROJECTIONS = ["sparse:flat:8192", "sparse:per_tensor:1024", "rademacher:flat:16", "rademacher:per_tensor:16",
               "gaussian:flat:16", "gaussian:per_tensor:16", "kronecker:32x32", "kronecker:64x128"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n matrix product on this device, now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_rss_gib() -> float:
    """This process's peak resident memory since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def timed_call(fn, device: torch.device) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.process_time() - cpu, time.perf_counter() - wall


def on_the_fly(model, names: list[str], spec) -> PerSampleGradients:
    """An extractor that projects `names` with `spec` during the backward pass and keeps no gradient."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in set(names)}
    device = next(model.parameters()).device
    return PerSampleGradients(model, [], [Projection(projectors_for(spec, shapes, device), key=partial(output_key, spec))])


def projection_costs(model, batches: list[tuple[torch.Tensor, torch.Tensor]], names: list[str], texts: list[str],
                     rounds: int, device) -> None:
    """Each projection's time over plain extraction of the same tensors, interleaved round by round.

    A round runs every extractor once over all `batches` (one batch of fixed tokens, or the probe set's packed
    batches), the order rotating from round to round.
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in set(names)}
    samples = sum(ids.shape[0] for ids, _ in batches)
    runs = {"none": PerSampleGradients(model, names)}
    for text in texts:
        spec = parse_projection(text)
        start = time.perf_counter()
        choices = set(projector_choices(spec, shapes, device).values())
        runs[text] = on_the_fly(model, names, spec)
        print(f"  built {text} ({', '.join(sorted(choices))}) in {time.perf_counter() - start:.1f} s", flush=True)

    def one_pass(extractor: PerSampleGradients) -> None:
        with extractor:
            for ids, labels in batches:
                extractor(ids, labels)

    times = {k: [] for k in runs}
    for extractor in runs.values():  # warm-up: buffers, caches
        with extractor:
            extractor(*max(batches, key=lambda b: b[0].numel()))
    keys = list(runs)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(timed_call(lambda: one_pass(runs[key]), device))
        print(f"  round {r + 1}: CPU ratios " + ", ".join(f"{k} {times[k][-1][0] / times['none'][-1][0]:.2f}"
                                                      for k in texts), flush=True)  # a long run can be read so far
    base = times["none"]
    cpu0 = statistics.median(t[0] for t in base)
    print(f"  {'projection':26s} {'CPU s/sample':>12s} {'CPU ratio':>10s} {'(min-max)':>11s} {'wall ratio':>10s}")
    print(f"  {'none (per-sample grads)':26s} {cpu0 / samples:12.4f} {1:10.2f} {'':11s} {1:10.2f}")
    for key in texts:
        ratios = [t[0] / b[0] for t, b in zip(times[key], base)]
        wall = statistics.median(t[1] / b[1] for t, b in zip(times[key], base))
        print(f"  {key:26s} {statistics.median(t[0] for t in times[key]) / samples:12.4f} "
              f"{statistics.median(ratios):10.2f} {f'({min(ratios):.2f}-{max(ratios):.2f})':>11s} {wall:10.2f}", flush=True)
    print(f"  ratio = CPU time with the projection (gradients not kept) / CPU time of extracting the same tensors' "
          f"per-sample gradients with nothing projected: median (min-max) of {rounds} per-round ratios, {samples} "
          f"samples per round")


def probe_batches(max_samples: int = 8, token_budget: int = 4096, shard: int = 64):
    """The 160 probe chats (sft) as extraction packs them, per shard of 64, and the small OLMo-2 of peers.py."""
    import numpy as np

    from peers import build  # benchmarks/peers.py: the probe set, its tokenizer and model
    from gradlake.tasks.common.loss import pad_batch
    from gradlake.tasks.gradients.batching import shard_batches

    encoded, pad_id, model = build()
    lengths = np.array([len(e.input_ids) for e in encoded])
    batches = [b for start in range(0, len(encoded), shard)
               for b in shard_batches(lengths[start:start + shard], start, max_samples, token_budget)]
    return model, [pad_batch([encoded[i] for i in b], pad_id) for b in batches]


def fly(model, ids, labels, names: list[str], texts: list[str], rounds: int, n_params: int, tokens: int, side: int,
        device, dtype) -> None:
    """Samples/s, fraction of the floor and peak RSS of extraction with one on-the-fly projection at a time."""
    batch = ids.shape[0]
    for text in texts:
        reset_peak_rss()
        spec = parse_projection(text)
        start = time.perf_counter()
        extractor = on_the_fly(model, names, spec)
        build = time.perf_counter() - start
        with extractor:
            first = timed_call(lambda: extractor(ids, labels), device)
            steady = [timed_call(lambda: extractor(ids, labels), device) for _ in range(rounds)]
        floor = matmul_rate(device, dtype, side) / (6 * n_params * tokens)
        wall = statistics.median(t[1] for t in steady)
        cpu = statistics.median(t[0] for t in steady)
        print(f"  {text:20s} {batch / wall:8.4f} samples/s = {batch / wall / floor:.3f} x floor ({floor:.3f} samples/s), "
              f"{cpu / batch:7.2f} CPU-s/sample, first call {first[1]:.0f} s, build {build:.0f} s, "
              f"peak RSS {peak_rss_gib():.1f} GiB", flush=True)
        del extractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small-olmo2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the square product for the FLOP rate")
    parser.add_argument("--projections", action="store_true", help="cost of each on-the-fly projection over plain extraction")
    parser.add_argument("--fly", action="store_true", help="samples/s and peak RSS with on-the-fly kronecker and sparse projections")
    parser.add_argument("--probe", action="store_true", help="--projections on the 160 probe chats (sft, packed per "
                        "64-sample shard as extraction packs them) through peers.py's small OLMo-2, not fixed tokens")
    parser.add_argument("--kinds", default="", help="comma-separated projections (KIND:SCOPE:DIM or kronecker:KOUTxKIN) "
                        f"for --projections/--fly; default {','.join(PROJECTIONS)} / kronecker:64x128,sparse:flat:8192")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config_cls, model_cls, sizes = SHAPES[args.shape]
    torch.manual_seed(0)
    config = config_cls(**sizes, max_position_embeddings=max(2048, args.tokens), pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)
    model = model_cls(config).to(device=device, dtype=dtype).eval()
    batches = None
    if args.probe:
        model, batches = probe_batches(args.batch)
        model = model.to(device=device, dtype=dtype)
        batches = [(ids.to(device), labels.to(device)) for ids, labels in batches]
    names = [n for n, _ in model.named_parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, config.vocab_size, (args.batch, args.tokens), device=device)
    labels = ids.clone()
    side = args.matmul_size or (4096 if device.type == "cuda" else 1024)
    if args.projections or args.fly:
        weights = [n for n, p in model.named_parameters() if p.dim() == 2]  # what every kind can project (kronecker: 2-D)
        tokens = (f"the probe set: {len(batches)} packed batches of {sum(b[0].shape[0] for b in batches)} chats"
                  if batches else f"{args.tokens} tokens")
        print(f"model {'probe-olmo2' if batches else args.shape} ({type(model).__name__}), {n_params / 1e6:.1f}M "
              f"parameters ({len(weights)} 2-D weights, {sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2) / 1e6:.1f}M), "
              f"{tokens}, batch {args.batch}, {args.dtype} on {device} ({torch.get_num_threads()} CPU threads)", flush=True)
        if args.projections:
            projection_costs(model, batches or [(ids, labels)], weights,
                             args.kinds.split(",") if args.kinds else PROJECTIONS, args.rounds, device)
        else:
            fly(model, ids, labels, weights, (args.kinds or "kronecker:64x128,sparse:flat:8192").split(","), args.rounds,
                n_params, args.tokens, side, device, dtype)
        return

    fixed_tokens(model, ids, labels, names, args, n_params, device, dtype)


def fixed_tokens(model, ids, labels, names: list[str], args, n_params: int, device, dtype) -> None:
    """Batched per-sample extraction and the one-sample loop beside a training step on the same fixed-length tokens.

    The per-sample gradients of both methods are checked against each other first.  Each round times every method
    once (CPU time of this process), the order rotating; printed are the medians and the min-max of the per-round
    ratios to the training step.
    """
    extractor = PerSampleGradients(model, names)  # its `with` freezes the weights: the others run outside it

    def batched() -> dict[str, torch.Tensor]:
        with extractor:
            return {n: g.clone() for n, g in extractor(ids, labels).items()}

    def loop() -> list[dict[str, torch.Tensor]]:
        kept = []
        for i in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            sample_losses(model(input_ids=ids[i:i + 1]).logits, labels[i:i + 1]).sum().backward()
            kept.append({n: p.grad.detach().to("cpu", copy=True).flatten() for n, p in model.named_parameters()})
        return kept

    def training_step() -> None:
        """One batched backward with summed (not per-sample) gradients: what a training step costs."""
        model.zero_grad(set_to_none=False)
        sample_losses(model(input_ids=ids).logits, labels).sum().backward()

    got, want = batched(), loop()
    worst = max(((got[n][i].float().cpu() - w[n].float()).norm() / w[n].float().norm().clamp_min(1e-30)).item()
                for i, w in enumerate(want) for n in names)
    print(f"largest relative error of a per-sample gradient against the loop: {worst:.1e}", flush=True)
    if worst > (1e-4 if dtype == torch.float32 else 5e-2):
        raise SystemExit(f"error: batched extraction disagrees with the one-sample loop ({worst:.1e}): not timing it")
    methods = {"training step (summed gradients)": training_step, "gradlake batched per-sample extraction": batched,
               "loop, one sample per backward, copied to CPU": loop}
    training_step()  # warm-up of its buffers
    seconds: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            seconds[key].append(timed_call(methods[key], device)[0])
    step = seconds[keys[0]]
    print(f"model {args.shape}, {n_params / 1e6:.1f}M parameters, {args.tokens} tokens, batch {args.batch}, {args.dtype} "
          f"on {device} ({torch.get_num_threads()} CPU threads); CPU time, median (min-max) of {args.rounds} "
          f"interleaved rounds, the order rotating")
    print(f"  {'method':46s} {'CPU s/sample':>12s} {'x training step':>16s} {'(min-max)':>11s}")
    for key in keys:
        ratios = [t / s for t, s in zip(seconds[key], step)]
        print(f"  {key:46s} {statistics.median(seconds[key]) / args.batch:12.4f} {statistics.median(ratios):16.2f} "
              f"{f'({min(ratios):.2f}-{max(ratios):.2f})':>11s}")
    loop_over = [t / s for t, s in zip(seconds[keys[2]], seconds[keys[1]])]
    print(f"  batched / loop samples per CPU-second: {statistics.median(loop_over):.2f}x "
          f"({min(loop_over):.2f}-{max(loop_over):.2f})")


if __name__ == "__main__":
    main()
