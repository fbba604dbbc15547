"""Stage 2, per-sample gradients: the engine (one backward pass per batch, per-sample gradients from hooks), the
extraction's plan checked before any write, its shards, batching by token budget and the memory footprint.
"""
