"""What an extraction must hold in memory at least, from the model's shapes alone, checked at plan time.

Only what is certain is counted: the weights, the per-sample gradient buffers of the kept
tensors (batch x numel in the model's dtype), the scratch of tensors projected but not
kept, and for mean modes one row-chunk's float64 sums.  Activations come on top and are
not counted, so a run refused here could never have fitted, and one accepted may still
run out (then lower the batch size or the token budget).
"""

from __future__ import annotations

import os

import torch


GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def device_memory(device: torch.device) -> int:
    """Total memory of the device (a GPU's, or this machine's RAM for the CPU), in bytes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def extraction_floor(shapes: dict[str, tuple[int, ...]], kept: list[str], projected: list[str], model_dtype: str,
                     batch: int, mean: bool, extra: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """Bytes an extraction needs at least on its device, by what needs them.

    `shapes` are the model's weights; `extra` the shapes of gradients that are not weights
    (the input embeddings'), which may be kept or projected too."""
    numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    item = DTYPE_BYTES[model_dtype]
    weights = sum(numel.values()) * item
    numel |= {n: int(torch.Size(s).numel()) for n, s in (extra or {}).items()}
    need = {"weights": weights,
            "per-sample gradients": batch * sum(numel[n] for n in kept) * item}
    scratch = max((numel[n] for n in projected if n not in kept), default=0)
    if scratch:
        need["projection scratch"] = batch * scratch * item
    if mean:
        need["float64 sums of a chunk"] = sum(numel[n] for n in kept) * 8
    return need


def check_extraction_memory(shapes: dict[str, tuple[int, ...]], kept: list[str], projected: list[str], model_dtype: str,
                            batch: int, mean: bool, device: torch.device,
                            extra: dict[str, tuple[int, ...]] | None = None) -> None:
    """One clear error, before anything is loaded or written, when the certain part alone exceeds the device."""
    need = extraction_floor(shapes, kept, projected, model_dtype, batch, mean, extra)
    total, have = sum(need.values()), device_memory(device)
    if total <= have:
        return
    parts = ", ".join(f"{what} {size / GiB:.1f}" for what, size in need.items() if size)
    advice = ["a smaller batch_size"] if batch > 1 else []
    if kept:
        advice += ["fewer layers (layers=...)", "keep_gradients off with projections (kronecker or sparse)"]
    raise ValueError(f"this extraction needs at least {total / GiB:.1f} GiB on {device} before any activation "
                     f"({parts} GiB, batch {batch}, {model_dtype}); the device has {have / GiB:.1f} GiB. "
                     f"Use {', or '.join(advice) or 'a larger device'}")
