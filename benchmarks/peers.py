"""gradlake beside its peers: Bergson and a one-sample-per-backward loop, in one run.

All three compute the gradient of each sample's mean token loss (sft: assistant tokens)
on the bundled probe set (160 chats of 45 to 306 tokens) with one small OLMo-2 (hidden
256, 4 layers, MLP 1024, vocabulary 2048 from a tokenizer trained on the probe texts),
and land every sample's gradient in a host array of (samples, parameters), row by row:

- gradlake: ``PerSampleGradients`` over the batches the extraction runs now
  (``shard_batches(lengths, 0, max_samples=8, token_budget=4096)``: sorted by length,
  packed), on the ``nn.Linear`` weights and on all tensors; and on the weights over the
  old batches of 8 in dataset order, beside them;
- Bergson (``InMemoryCollector`` run by its ``CollectorComputer``, as ``bergson build``
  runs it, with its own token-budget batching, ``allocate_batches`` at its default
  ``token_batch_size``): no projection, no normaliser, no preconditioner, no unit
  normalisation, ``loss_reduction="mean"``.  Bergson covers ``nn.Linear`` layers only,
  so it is compared with gradlake on those weights (the lm_head included: the collector
  gets the whole model, not ``base_model``);
- the loop: one sample per backward pass, every parameter's gradient copied out; compared
  with gradlake on all tensors.

For scale, the floor: 6 x parameters x tokens FLOPs per sample at the rate of a 1024^2
matrix product.  Forming per-sample gradients costs the FLOPs of a plain backward's weight
gradients, so on a CPU, where one chat of a hundred tokens already fills the matrix units,
no method can run much past it.

Before timing, the per-sample gradients of a few samples are checked to agree between
the three (relative error of each tensor).  Then the methods run in interleaved rounds
(the order rotating each round), each round a full pass over the probe set; the median
over rounds of samples/s (CPU time of this process, and wall time) is printed, and the
ratios as medians of the per-round ratios.  The machine is shared: one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/peers.py            # make bench-peers
    OMP_NUM_THREADS=1 python benchmarks/peers.py --rounds 5

Bergson is installed for this benchmark only (``make bench-peers``; see constraints.txt).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # Bergson's progress bar, once per pass

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from gradlake.tasks.gradients.batching import padded_tokens, shard_batches
from gradlake.tasks.gradients.engine import PerSampleGradients
from gradlake.tasks.common.loss import Encoded, encode_sample, pad_batch, sample_losses
from gradlake.tasks.data.probes import load_probe_set, probe_variant
from gradlake.tasks.training.tiny import tiny_config, train_tokenizer

SIZES = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=1024)
VOCAB = 2048
CHECK_TOLERANCE = 1e-4  # relative error (Frobenius) of a per-sample gradient tensor, float32


def build(seed: int = 0):
    """The probe set's chats encoded for sft, and a small random-weight OLMo-2 with their tokenizer."""
    from transformers import AutoModelForCausalLM

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer((m["content"] for chat in chats for m in chat), vocab_size=VOCAB)
    encoded = [encode_sample(tokenizer, chat, "sft", max_length=1024) for chat in chats]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("olmo2", tokenizer, **SIZES), dtype=torch.float32).eval()
    return encoded, tokenizer.pad_token_id, model


def set_trainable(model: nn.Module, mode: str) -> None:
    """What requires grad: 'all' (the loop), 'bergson' (its setup: only the input embeddings)."""
    model.requires_grad_(mode == "all")
    if mode == "bergson":
        model.get_input_embeddings().requires_grad_(True)


def column_slices(model: nn.Module) -> dict[str, slice]:
    """Each parameter's columns in a row of the host array holding every parameter's gradient."""
    out, at = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(at, at + p.numel())
        at += p.numel()
    return out


def gradlake_pass(model, encoded: list[Encoded], pad_id: int, names: list[str], batches: list[np.ndarray],
                  dest: torch.Tensor, cols: dict[str, slice]) -> Callable[[], None]:
    """A full pass of gradlake's extraction over `batches`, each gradient copied to its row of `dest`."""
    extractor = PerSampleGradients(model, names)

    def run(limit: int | None = None) -> None:
        set_trainable(model, "all")  # the extractor freezes and restores
        with extractor:
            for batch in batches[:limit]:
                ids, labels = pad_batch([encoded[i] for i in batch], pad_id)
                grads = extractor(ids, labels)
                rows = torch.from_numpy(batch)
                for name in names:
                    dest[rows, cols[name]] = grads[name]
    return run


def loop_pass(model, encoded: list[Encoded], pad_id: int, dest: torch.Tensor, cols: dict[str, slice],
              rows: Sequence[int] | None = None) -> Callable[[], None]:
    """A pass of the loop over `rows` (all samples when None): one sample per backward, every gradient copied out."""
    params = list(model.named_parameters())
    rows = range(len(encoded)) if rows is None else rows

    def run() -> None:
        set_trainable(model, "all")
        for i in rows:
            model.zero_grad(set_to_none=True)
            ids, labels = pad_batch([encoded[i]], pad_id)
            sample_losses(model(input_ids=ids).logits, labels).sum().backward()
            for name, p in params:
                dest[i, cols[name]] = p.grad.reshape(-1)
        model.zero_grad(set_to_none=True)
    return run


def bergson_pass(model, encoded: list[Encoded], run_dir: str):
    """A full pass of Bergson's in-memory collection (its batching, no projection), and its collector."""
    from datasets import Dataset

    from bergson import GradientProcessor, IndexConfig, InMemoryCollector
    from bergson.collector.collector import CollectorComputer
    from bergson.data import allocate_batches

    data = Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels() for e in encoded],
                              "length": [len(e.input_ids) for e in encoded]})
    cfg = IndexConfig(run_dir, loss_reduction="mean", projection_dim=0)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    processor = GradientProcessor(projection_dim=None, include_bias=cfg.include_bias)  # no normalizers
    set_trainable(model, "bergson")
    collector = InMemoryCollector(model=model, data=data, cfg=cfg, processor=processor)
    batches = allocate_batches(data["length"][:], cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
    logging.disable(logging.INFO)  # the modules it tracks, listed on construction
    try:
        computer = CollectorComputer(model, data, collector=collector, batches=batches, cfg=cfg)
    finally:
        logging.disable(logging.NOTSET)
    computer.logger.setLevel(logging.WARNING)  # "Total processed" after every pass

    def run() -> None:
        set_trainable(model, "bergson")
        computer.run_with_collector_hooks()
    return run, collector, cfg.token_batch_size, batches


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_agreement(samples: list[int], linear: list[str], all_names: list[str], cols: dict[str, slice],
                    gradlake_all: torch.Tensor, loop_all: torch.Tensor, bergson: dict[str, torch.Tensor]) -> None:
    """Print the worst relative error per pair, over the samples and tensors checked; fail past the tolerance.

    Row r of each argument holds sample ``samples[r]``; Bergson's are keyed by module name.
    """
    rows = range(len(samples))
    pairs = {
        "gradlake vs loop (all tensors)": [relative_error(gradlake_all[i, cols[n]], loop_all[i, cols[n]])
                                           for i in rows for n in all_names],
        "gradlake vs Bergson (nn.Linear)": [relative_error(gradlake_all[i, cols[n]], bergson[n[:-len(".weight")]][i])
                                            for i in rows for n in linear],
        "Bergson vs loop (nn.Linear)": [relative_error(bergson[n[:-len(".weight")]][i], loop_all[i, cols[n]])
                                        for i in rows for n in linear],
    }
    print(f"agreement on samples {samples} (relative Frobenius error per tensor, worst):")
    for label, errors in pairs.items():
        print(f"  {label:34s} {max(errors):.2e} over {len(errors)} tensors")
    worst = max(max(e) for e in pairs.values())
    if worst > CHECK_TOLERANCE:
        raise SystemExit(f"per-sample gradients disagree: worst relative error {worst:.2e} > {CHECK_TOLERANCE:.0e}")


def matmul_rate(n: int = 1024, reps: int = 10) -> float:
    """FLOP/s (per CPU second of this process) of an n x n float32 matrix product, now."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    start = time.process_time()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    return 2 * n**3 * reps / (time.process_time() - start)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each a full pass of every method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    encoded, pad_id, model = build()
    n = len(encoded)
    lengths = np.array([len(e.input_ids) for e in encoded])
    all_names = [name for name, _ in model.named_parameters()]
    linear = [f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    cols = column_slices(model)
    numel = {name: p.numel() for name, p in model.named_parameters()}
    budget = shard_batches(lengths, 0, max_samples=8, token_budget=4096)
    in_order = shard_batches(lengths, 0, max_samples=8, token_budget=None)

    # One host array for gradlake and the loop (every parameter's columns), one inside Bergson's collector.
    dest = torch.zeros(n, sum(numel.values()))
    bergson_run, collector, bergson_budget, bergson_batches = bergson_pass(model, encoded, tempfile.mkdtemp())
    methods = {
        "gradlake linear, budget": gradlake_pass(model, encoded, pad_id, linear, budget, dest, cols),
        "gradlake linear, order": gradlake_pass(model, encoded, pad_id, linear, in_order, dest, cols),
        "Bergson linear": bergson_run,
        "gradlake all, budget": gradlake_pass(model, encoded, pad_id, all_names, budget, dest, cols),
        "loop all": loop_pass(model, encoded, pad_id, dest, cols),
    }
    lengths_list = lengths.tolist()
    bergson_padded = sum(len(b) * max(lengths_list[i] for i in b) for b in bergson_batches)
    described = {
        "gradlake linear, budget": f"shard_batches(8, 4096): {len(budget)} batches, {padded_tokens(lengths, budget)} tokens",
        "gradlake linear, order": f"8 in dataset order: {len(in_order)} batches, {padded_tokens(lengths, in_order)} tokens",
        "Bergson linear": f"allocate_batches({bergson_budget}): {len(bergson_batches)} batches, {bergson_padded} tokens",
        "gradlake all, budget": f"shard_batches(8, 4096): {len(budget)} batches",
        "loop all": f"1 per backward: {n} passes, {int(lengths.sum())} tokens",
    }

    # Full passes of gradlake and Bergson and the loop on a few samples give the gradients to check
    # (samples 0-7 share a padded batch in dataset order; the others are the shortest ones of
    # two budget batches).  They warm buffers too; the other variants are warmed on two batches.
    samples = sorted({0, 5, int(budget[0][-1]), int(budget[-1][-1])})
    methods["gradlake all, budget"]()
    gradlake_all = dest[samples].clone()
    loop_pass(model, encoded, pad_id, dest, cols, rows=samples)()
    loop_all = dest[samples].clone()
    bergson_run()
    bergson = {k: v[samples] for k, v in collector.gradients.items()}
    check_agreement(samples, linear, all_names, cols, gradlake_all, loop_all, bergson)
    del gradlake_all, loop_all, bergson
    for key in ("gradlake linear, budget", "gradlake linear, order"):
        methods[key](2)

    keys = list(methods)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    rates = []
    for r in range(args.rounds):
        rates.append(matmul_rate())
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(timed(methods[key]))

    n_params = sum(numel.values())
    n_linear = sum(numel[k] for k in linear)
    print(f"model OLMo-2 (hidden 256, 4 layers, MLP 1024, vocabulary {VOCAB}), {n_params / 1e6:.2f}M parameters, "
          f"{len(linear)} nn.Linear weights ({n_linear / 1e6:.2f}M); probe set: {n} chats, sft, "
          f"{lengths.min()} to {lengths.max()} tokens ({int(lengths.sum())} in all); {torch.get_num_threads()} CPU "
          f"thread; median of {args.rounds} interleaved rounds")
    rate = statistics.median(rates)
    floor = rate / (6 * n_params * lengths.mean())
    print(f"  floor: 6 x parameters x tokens FLOPs per sample at {rate / 1e9:.0f} GFLOP per CPU second (1024^2 "
          f"matmul): {floor:.2f} samples/s")
    print(f"  {'method':24s} {'CPU samples/s':>13s} {'wall samples/s':>14s}  batches (tokens padded)")
    for key in keys:
        cpu = statistics.median(n / t[0] for t in times[key])
        wall = statistics.median(n / t[1] for t in times[key])
        print(f"  {key:24s} {cpu:13.2f} {wall:14.2f}  {described[key]}")

    def ratio(fast: str, slow: str) -> str:
        cpu = statistics.median(s[0] / f[0] for f, s in zip(times[fast], times[slow]))
        wall = statistics.median(s[1] / f[1] for f, s in zip(times[fast], times[slow]))
        return f"{cpu:.2f}x CPU, {wall:.2f}x wall"

    print("ratios (samples/s over samples/s; median of per-round ratios):")
    print(f"  gradlake / Bergson on nn.Linear, budget batches:  {ratio('gradlake linear, budget', 'Bergson linear')}"
          "   (goal >= 1.5x)")
    print(f"  gradlake / Bergson on nn.Linear, dataset order:   {ratio('gradlake linear, order', 'Bergson linear')}")
    print(f"  gradlake / loop on all tensors, budget batches:   {ratio('gradlake all, budget', 'loop all')}"
          "   (goal >= 2x)")


if __name__ == "__main__":
    main()
