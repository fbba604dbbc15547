"""gradlake beside a training step, Bergson and a one-sample-per-backward loop, in one run.

Every method computes the gradient of each sample's mean token loss (sft: assistant tokens)
on the bundled probe set (160 chats of 45 to 306 tokens) with one small OLMo-2 (hidden 256,
4 layers, MLP 1024, vocabulary 2048 from a tokenizer trained on the probe texts):

- training step: a plain forward and backward of the summed losses over the same batches as
  the kernel (parameter gradients only, no per-sample ones): the floor every method sits on;
- kernel: gradlake's ``PerSampleGradients`` over the batches extraction computes with its
  defaults (per 64-sample shard, ``shard_batches(8 samples, 4096 tokens)`` in windows of whole
  chunks), every gradient copied to its row of one host array; on all tensors and on the
  ``nn.Linear`` weights (Bergson's);
- extraction function: ``extract_shard`` over every shard of a fresh local lake group made by
  ``plan_extraction``/``create_group`` (untimed, once per run in the flow; its CPU time is
  printed beside), store mode, every parameter, its lake writes included;
- command: ``gradlake extract`` in a process of its own into a fresh local lake (the CPU time
  of the child, ``getrusage(RUSAGE_CHILDREN)``), and its fixed start-up: the same command on a
  lake holding one sample;
- Bergson 2.5.1 (``CollectorComputer`` as ``bergson build`` runs it, its own token batches, no
  projection, normaliser or preconditioner, ``loss_reduction="mean"``), on ``nn.Linear``
  layers: in memory (``InMemoryCollector``) and writing its index to disk
  (``GradientCollector``);
- the loop: one sample per backward pass, every parameter's gradient copied out.

Before timing, the gradients of a few samples are checked against the loop's (relative
Frobenius error of each tensor; the extraction function's, the command's and Bergson's
on-disk index read back from what they wrote).  Then the methods run in interleaved rounds
(the order rotating each round), each a full pass over the samples; printed are the CPU
seconds per pass (median) and each method's ratio to the kernel and to the training step as
the median of the per-round ratios with their min-max spread.  The machine is shared: CPU
time, one torch thread.  ``--whole-set`` adds the kernel over all samples packed in one
window (what this benchmark did before; extraction never packs so).

    OMP_NUM_THREADS=1 python benchmarks/peers.py            # make bench-peers
    OMP_NUM_THREADS=1 python benchmarks/peers.py --rounds 5
    OMP_NUM_THREADS=1 python benchmarks/peers.py --quick    # 16 samples, 1 round

Bergson is installed for this benchmark only (``make bench-peers``; see constraints.txt); without it
its rows are left out.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # Bergson's progress bar, once per pass

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradlake.tasks.gradients.batching import padded_tokens, shard_batches
from gradlake.tasks.gradients.engine import PerSampleGradients
from gradlake.tasks.common.loss import Encoded, encode_sample, pad_batch, sample_losses
from gradlake.tasks.data.probes import load_probe_set, probe_variant
from gradlake.tasks.training.tiny import tiny_config, train_tokenizer
from peers_lake import BergsonDisk, Command, Extraction, extraction_batches, save_model, spec_for

SIZES = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=1024)
VOCAB = 2048
CHECK_TOLERANCE = 1e-5  # relative error (Frobenius) of a per-sample gradient tensor, float32


def build(seed: int = 0, with_tokenizer: bool = False):
    """The probe set's chats encoded for sft, the padding id and a small random-weight OLMo-2 (and their tokenizer)."""
    from transformers import AutoModelForCausalLM

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer((m["content"] for chat in chats for m in chat), vocab_size=VOCAB)
    encoded = [encode_sample(tokenizer, chat, "sft", max_length=1024) for chat in chats]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("olmo2", tokenizer, **SIZES), dtype=torch.float32).eval()
    return (encoded, tokenizer.pad_token_id, model) + ((tokenizer,) if with_tokenizer else ())


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
    """A full pass of Bergson's in-memory collection (its batching, no projection); its collector, batches and data."""
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
    return run, collector, batches, data


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_agreement(samples: list[int], reference: dict[str, torch.Tensor], got: dict[str, dict[str, torch.Tensor]]) -> None:
    """Print each method's worst relative error against the loop over the samples and tensors checked; fail past the
    tolerance.  `reference` and each of `got` map a parameter name to its rows of `samples`, in that order."""
    print(f"agreement with the loop on samples {samples} (relative Frobenius error per tensor, worst):")
    worst = 0.0
    for label, grads in got.items():
        errors = [relative_error(grads[n][i].reshape(-1), reference[n][i].reshape(-1))
                  for n in grads for i in range(len(samples))]
        worst = max(worst, *errors)
        print(f"  {label:34s} {max(errors):.2e} over {len(errors)} tensors")
    if worst > CHECK_TOLERANCE:
        raise SystemExit(f"per-sample gradients disagree: worst relative error {worst:.2e} > {CHECK_TOLERANCE:.0e}")


def step_pass(model, encoded: list[Encoded], pad_id: int, batches: list[np.ndarray]) -> Callable[[], None]:
    """A plain training step's forward and backward over `batches` (the summed losses; parameter gradients only)."""
    def run() -> None:
        set_trainable(model, "all")
        for batch in batches:
            model.zero_grad(set_to_none=True)
            ids, labels = pad_batch([encoded[i] for i in batch], pad_id)
            sample_losses(model(input_ids=ids).logits, labels).sum().backward()
        model.zero_grad(set_to_none=True)
    return run


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def spread(values: list[float]) -> str:
    """Median and min-max of per-round values."""
    return f"{statistics.median(values):5.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each a full pass of every method")
    parser.add_argument("--samples", type=int, default=None, help="the first N probe chats (default: all 160)")
    parser.add_argument("--quick", action="store_true", help="16 samples, 1 round: a check that everything runs")
    parser.add_argument("--whole-set", action="store_true", help="add the kernel over all samples packed in one window")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.rounds = args.samples or 16, 1
    torch.set_num_threads(args.threads)
    try:
        import bergson  # noqa: F401
        with_bergson = True
    except ImportError:
        with_bergson = False
        print("Bergson is not installed (`make bench-peers` installs it): its rows are left out")

    encoded, pad_id, model, tokenizer = build(with_tokenizer=True)
    encoded = encoded[:args.samples]
    n = len(encoded)
    root = Path(tempfile.mkdtemp(prefix="gradlake-peers-"))
    model_dir = save_model(model, tokenizer, root / "model")
    lengths = np.array([len(e.input_ids) for e in encoded])
    all_names = [name for name, _ in model.named_parameters()]
    linear = [f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    cols = column_slices(model)
    n_params = sum(p.numel() for p in model.parameters())
    batches = extraction_batches(lengths, spec_for(model_dir, "memory://unused"), n_params * 4)
    dest = torch.zeros(n, n_params)  # one host array for the kernel and the loop (every parameter's columns)

    extraction, command = Extraction(model_dir, root, args.samples), Command(model_dir, root, args.samples)
    startup = Command(model_dir, root, 1)
    methods = {
        "training step": (None, step_pass(model, encoded, pad_id, batches)),
        "kernel": (None, gradlake_pass(model, encoded, pad_id, all_names, batches, dest, cols)),
        "kernel (nn.Linear)": (None, gradlake_pass(model, encoded, pad_id, linear, batches, dest, cols)),
        "extraction function": (extraction.prepare, extraction.run),
        "command": (command.prepare, command.run),
        "loop": (None, loop_pass(model, encoded, pad_id, dest, cols)),
    }
    if args.whole_set:
        whole = shard_batches(lengths, 0, max_samples=8, token_budget=4096)
        methods["kernel, whole set in one window"] = (None, gradlake_pass(model, encoded, pad_id, all_names, whole, dest, cols))
    if with_bergson:
        bergson_run, collector, bergson_batches, data = bergson_pass(model, encoded, str(root / "bergson-memory"))
        disk = BergsonDisk(model, data, bergson_batches, root, lambda: set_trainable(model, "bergson"))
        methods["Bergson in memory (nn.Linear)"] = (None, bergson_run)
        methods["Bergson to disk (nn.Linear)"] = (disk.prepare, disk.run)

    # One pass of each on everything (warming buffers and caches), then the checked samples' gradients against the loop's:
    # samples 0 and 5, and the shortest of the first and the last batch.
    samples = sorted({0, min(5, n - 1), int(batches[0][-1]), int(batches[-1][-1])})
    got = {}
    for key, (prepare, run) in methods.items():
        if prepare:
            prepare()
        run()
        if key.startswith("kernel"):
            got[key] = {name: dest[samples, cols[name]] for name in (linear if "Linear" in key else all_names)}
    got["extraction function (read back)"] = extraction.rows(samples, all_names)
    got["command (read back)"] = command.rows(samples, all_names)
    if with_bergson:
        modules = {f"{m}.weight": m for m in collector.gradients}
        got["Bergson in memory"] = {name: collector.gradients[m][samples] for name, m in modules.items()}
        on_disk = disk.rows(samples)
        got["Bergson to disk (read back)"] = {name: on_disk[m] for name, m in modules.items()}
    loop_pass(model, encoded, pad_id, dest, cols, rows=samples)()
    check_agreement(samples, {name: dest[samples, cols[name]] for name in all_names}, got)
    tokens = extraction.group.tokens("input_ids", slice(0, n))
    if any(list(tokens[i][tokens[i] >= 0]) != encoded[i].input_ids for i in range(n)):
        raise SystemExit("the extraction's stored tokens differ from the ones the other methods ran on")

    keys = list(methods)
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            prepare, run = methods[key]
            if prepare:
                prepare()
            spent, _ = timed(run)
            cpu[key].append(command.cpu_s[-1] if key == "command" else spent)
        startup.prepare()
        startup.run()

    print(f"model OLMo-2 (hidden 256, 4 layers, MLP 1024, vocabulary {VOCAB}), {n_params / 1e6:.2f}M parameters "
          f"({sum(dict(model.named_parameters())[k].numel() for k in linear) / 1e6:.2f}M in {len(linear)} nn.Linear "
          f"weights); probe set: {n} chats, sft, {lengths.min()} to {lengths.max()} tokens ({int(lengths.sum())} in all, "
          f"{padded_tokens(lengths, batches)} padded in extraction's {len(batches)} batches); {torch.get_num_threads()} "
          f"CPU thread; CPU time, median and min-max of {args.rounds} interleaved rounds")
    print(f"  {'method':34s} {'CPU-s':>7s} {'samples/CPU-s':>13s}  {'x kernel':>18s}  {'x training step':>18s}")
    for key in keys:
        print(f"  {key:34s} {statistics.median(cpu[key]):7.2f} {n / statistics.median(cpu[key]):13.2f}  "
              f"{spread([a / b for a, b in zip(cpu[key], cpu['kernel'])]):>18s}  "
              f"{spread([a / b for a, b in zip(cpu[key], cpu['training step'])]):>18s}")
    fixed = statistics.median(startup.cpu_s)
    print(f"  command's fixed start-up (the same command on 1 sample): {fixed:.2f} CPU-s (rounds "
          f"{', '.join(f'{c:.1f}' for c in startup.cpu_s)}); the command less it: "
          f"{spread([(c - s) / k for c, s, k in zip(cpu['command'], startup.cpu_s, cpu['kernel'])])} the kernel")
    print(f"  planning and creating the group (untimed above, once per run): {statistics.median(extraction.plan_s):.2f} CPU-s")
    if with_bergson:
        for key in ("Bergson in memory (nn.Linear)", "Bergson to disk (nn.Linear)"):
            print(f"  kernel (nn.Linear) / {key}: "
                  f"{spread([b / a for a, b in zip(cpu['kernel (nn.Linear)'], cpu[key])])} (samples/s over samples/s)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
