"""GPT-2 at its real shape (124M, random weights): gradlake's batched per-sample gradients beside a one-sample loop.

GPT-2 brings what OLMo lacks: learned position embeddings, ``Conv1D`` layers (weights stored
(in, out)), LayerNorm with biases (vmapped vector-Jacobian products) and tied embeddings.
On probe chats of variable length (rendered with the tulu template by a tokenizer trained on
the probe texts), both methods compute every parameter's gradient of each sample's mean sft
loss; the per-sample agreement is checked first, then the methods alternate over `--rounds`
(CPU time, the order swapping each round) and the median ratio of their samples per CPU-second
is printed with its min-max (one torch thread: the machine is shared).

    OMP_NUM_THREADS=1 python benchmarks/gpt2.py --samples 8 --rounds 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import statistics
import time

import torch

from gradlake.tasks.gradients.batching import shard_batches
from gradlake.tasks.gradients.engine import PerSampleGradients
from gradlake.tasks.common.loss import TULU, encode_sample, pad_batch
from gradlake.tasks.data.probes import load_probe_set, probe_variant
from gradlake.tasks.training.tiny import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="probe chats per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each method once per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, GPT2Config

    chats = list(probe_variant(load_probe_set(), "original")["messages"])[: args.samples]
    tokenizer = train_tokenizer(m["content"] for chat in chats for m in chat)
    encoded = [encode_sample(tokenizer, chat, "sft", 1024, TULU) for chat in chats]
    lengths = [len(e.input_ids) for e in encoded]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(), dtype=torch.float32).eval()  # GPT-2 small: 124M
    names = [n for n, _ in model.named_parameters()]
    batches = shard_batches(torch.tensor(lengths).numpy(), 0, 4, 4096)
    print(f"GPT-2 124M, random weights; {len(chats)} chats of {min(lengths)}-{max(lengths)} tokens; "
          f"{len(names)} tensors, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M values a sample")

    def loop(each=lambda i, grad: None, rows=range(len(encoded))) -> None:
        """Each sample's gradient, one backward per sample, handed to `each` (the timed rounds keep none: memory)."""
        for i in rows:
            e = encoded[i]
            model.zero_grad(set_to_none=True)
            model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss.backward()
            each(i, torch.cat([p.grad.flatten() for p in model.parameters()]))

    extractor = PerSampleGradients(model, names)  # its `with` freezes the weights: the loop runs outside it

    def gradlake(each=lambda i, grad: None, some=batches) -> None:
        """Each sample's gradient from gradlake's batched extraction, handed to `each`."""
        with extractor:
            for rows in some:
                ids, labels = pad_batch([encoded[i] for i in rows], tokenizer.pad_token_id)
                grads = extractor(ids, labels)
                for j, i in enumerate(rows):
                    each(int(i), torch.cat([grads[n][j] for n in names]))

    got, errors = {}, []
    for rows in batches:  # a batch at a time: 124M values a sample
        gradlake(got.__setitem__, [rows])
        loop(lambda i, want: errors.append(((got.pop(i) - want).norm() / want.norm()).item()), [int(i) for i in rows])
    print(f"largest relative error against the loop: {max(errors):.1e}", flush=True)
    if max(errors) > 1e-4:
        raise SystemExit(f"error: gradlake's per-sample gradients disagree with the loop ({max(errors):.1e}): not timing them")
    ratios, order = [], [("loop", loop), ("gradlake", gradlake)]
    for r in range(args.rounds):  # the order alternates round by round: what runs second is not always the same
        seconds = {}
        for name, method in order[:: 1 if r % 2 == 0 else -1]:
            began = time.process_time()
            method()
            seconds[name] = time.process_time() - began
        ratios.append(seconds["loop"] / seconds["gradlake"])
        print(f"  round {r + 1}: loop {seconds['loop']:.1f} CPU-s, gradlake {seconds['gradlake']:.1f} CPU-s", flush=True)
    print(f"gradlake / loop samples per CPU-second: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}; "
          f"rounds {[round(r, 2) for r in ratios]})")


if __name__ == "__main__":
    main()
