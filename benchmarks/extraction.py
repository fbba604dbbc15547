"""Extraction throughput, measured side by side in one run.

Prints samples/s of (1) gradlake's batched per-sample extraction, (2) the seed
studies' loop (one sample per backward pass, every gradient copied to CPU), and
(3) the floor: 6 x parameters x tokens FLOPs per sample at the matrix-multiply rate
measured here, now.  The three are measured interleaved, round after round, and the
median round is reported, so that load from other processes hits them alike.

    python benchmarks/extraction.py                       # small OLMo-2, 128 tokens, CPU
    python benchmarks/extraction.py --shape amd-olmo-1b --device cuda --dtype bfloat16 --tokens 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM, OlmoConfig, OlmoForCausalLM

from gradlake.tasks.gradients import PerSampleGradients
from gradlake.tasks.loss import sample_losses

SHAPES = {
    # A small OLMo-2 of a few million parameters.
    "small-olmo2": (Olmo2Config, Olmo2ForCausalLM, dict(vocab_size=2048, hidden_size=384, intermediate_size=1024,
                                                          num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6)),
    "small-olmo2-wide": (Olmo2Config, Olmo2ForCausalLM, dict(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                                                               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8)),
    # AMD-OLMo-1B's shapes (random weights): 16 layers, 2048 wide, MLP 8192, vocab 50304.
    "amd-olmo-1b": (OlmoConfig, OlmoForCausalLM, dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                                       num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16)),
}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small-olmo2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the square product for the FLOP rate")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config_cls, model_cls, sizes = SHAPES[args.shape]
    torch.manual_seed(0)
    config = config_cls(**sizes, max_position_embeddings=max(2048, args.tokens), pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)
    model = model_cls(config).to(device=device, dtype=dtype).eval()
    names = [n for n, _ in model.named_parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, config.vocab_size, (args.batch, args.tokens), device=device)
    labels = ids.clone()
    side = args.matmul_size or (4096 if device.type == "cuda" else 1024)

    def batched() -> float:
        with PerSampleGradients(model, names) as grads:
            grads(ids, labels)  # warm buffers
            sync(device)
            start = time.perf_counter()
            grads(ids, labels)
            sync(device)
            return args.batch / (time.perf_counter() - start)

    def loop() -> float:
        sync(device)
        start = time.perf_counter()
        for i in range(args.batch):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss.backward()
            kept = [p.grad.detach().to("cpu", copy=True) for p in model.parameters()]
        sync(device)
        del kept
        return args.batch / (time.perf_counter() - start)

    def training_step() -> float:
        """One batched backward with summed (not per-sample) gradients: what a training step costs."""
        sync(device)
        start = time.perf_counter()
        model.zero_grad(set_to_none=False)
        sample_losses(model(input_ids=ids).logits, labels).sum().backward()
        sync(device)
        return args.batch / (time.perf_counter() - start)

    fast, slow, step, floor = [], [], [], []
    batched(), loop(), training_step()  # warm-up
    for _ in range(args.rounds):
        floor.append(matmul_rate(device, dtype, side) / (6 * n_params * args.tokens))
        fast.append(batched())
        slow.append(loop())
        step.append(training_step())
    f, s, fl, st = (statistics.median(v) for v in (fast, slow, floor, step))
    print(f"model {args.shape} ({model_cls.__name__}), {n_params / 1e6:.1f}M parameters, {args.tokens} tokens, "
          f"batch {args.batch}, {args.dtype} on {device} ({torch.get_num_threads()} CPU threads); "
          f"median of {args.rounds} interleaved rounds")
    print(f"  floor (6*P*T FLOPs at {fl * 6 * n_params * args.tokens / 1e9:.0f} GFLOP/s, {side}^2 matmul): {fl:8.2f} samples/s")
    print(f"  gradlake batched per-sample extraction:         {f:8.2f} samples/s  {f * args.tokens:10.0f} tokens/s  = {f / fl:.2f} x floor")
    print(f"  loop, one sample per backward, copied to CPU:   {s:8.2f} samples/s  {s * args.tokens:10.0f} tokens/s  = {s / fl:.2f} x floor")
    print(f"  for scale, a batched training step (summed gradients, no per-sample): {st:8.2f} samples/s = {st / fl:.2f} x floor")
    print(f"  batched / loop: {f / s:.2f}x")


if __name__ == "__main__":
    main()
