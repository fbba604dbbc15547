"""The methods of `benchmarks/peers.py` that write: gradlake's extraction function and command, Bergson to disk.

Each is a pair (prepare, run): `prepare` (not timed) makes what a fresh run needs (a lake holding
the probe set, a group planned and created, an empty directory); `run` is what is timed.
Each also says where its output of a sample can be read back, for the agreement check.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gradlake.lake import layout
from gradlake.lake.gradients import GradientGroup
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.data.probes import store_probe_set
from gradlake.tasks.gradients.batching import WINDOW_BYTES, shard_batches, window_chunks
from gradlake.tasks.gradients.extract import extract_shard
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction

CHECKPOINT = "checkpoint"


def save_model(model, tokenizer, root: Path) -> Path:
    """The benchmark's model and tokenizer saved where a `ModelSpec` finds them (`root`/checkpoint)."""
    model.save_pretrained(root / CHECKPOINT)
    tokenizer.save_pretrained(root / CHECKPOINT)
    return root


def extraction_batches(lengths: np.ndarray, spec: ExtractionSpec, bytes_per_sample: int) -> list[np.ndarray]:
    """The batches extraction computes with `spec`'s settings: per shard, packed within its windows of chunks."""
    unit = spec.batch_size  # a new group's chunk height
    window = unit * window_chunks(unit, bytes_per_sample, WINDOW_BYTES)
    out = []
    for shard in range(layout.n_shards(len(lengths), spec.shard_size)):
        start, stop = layout.shard_bounds(shard, len(lengths), spec.shard_size)
        out += shard_batches(lengths[start:stop], start, spec.batch_size, spec.token_budget, window)
    return out


def spec_for(model_dir: Path, lake: str) -> ExtractionSpec:
    """The extraction's defaults on the benchmark's model and the probe set in `lake`."""
    return ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint=CHECKPOINT), lake=lake)


class Extraction:
    """`extract_shard` over every shard of a fresh group, as the flow's tasks call it (planning and the group's
    creation are done first, untimed: the flow does them once per run)."""

    def __init__(self, model_dir: Path, root: Path, samples: int | None = None):
        self.model_dir, self.root, self.samples, self.rounds = model_dir, root, samples, 0
        self.group: GradientGroup | None = None
        self.plan_s: list[float] = []

    def prepare(self) -> None:
        lake = self.root / f"extraction-{self.rounds}"
        self.rounds += 1
        shutil.rmtree(self.root / f"extraction-{self.rounds - 3}", ignore_errors=True)  # keep two for reading back
        store_probe_set(f"file://{lake}", "probe", self.samples)
        self.spec = spec_for(self.model_dir, f"file://{lake}")
        began = time.process_time()
        self.group = create_group(plan_extraction(self.spec))
        self.plan_s.append(time.process_time() - began)

    def run(self) -> None:
        for shard in range(layout.n_shards(self.group.plan.n_samples, self.spec.shard_size)):
            extract_shard(self.spec, self.group, shard, log=lambda *_: None)

    def rows(self, samples: list[int], names: list[str]) -> dict[str, torch.Tensor]:
        """The last run's stored gradients of `samples`, read back from the lake."""
        return {n: torch.from_numpy(np.asarray(self.group.array(n)[samples])) for n in names}


def child_cpu() -> float:
    """CPU seconds (user and system) of this process's children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Command:
    """`gradlake extract` as a user runs it, in a process of its own, into a fresh local lake holding the probe set
    (`samples` of it: 1 measures the command's fixed start-up).  Timed by its children's CPU time, not this
    process's."""

    def __init__(self, model_dir: Path, root: Path, samples: int | None = None):
        self.model_dir, self.root, self.samples, self.rounds = model_dir, root, samples, 0
        self.cpu_s: list[float] = []

    def prepare(self) -> None:
        self.lake = self.root / f"command-{self.samples or 'all'}-{self.rounds}"
        self.rounds += 1
        shutil.rmtree(self.root / f"command-{self.samples or 'all'}-{self.rounds - 2}", ignore_errors=True)
        store_probe_set(f"file://{self.lake}", "probe", self.samples)

    def run(self) -> None:
        gradlake = Path(sys.executable).with_name("gradlake")
        argv = [str(gradlake), "extract", "--model", str(self.model_dir), "--checkpoint", CHECKPOINT,
                "--lake", f"file://{self.lake}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        before = child_cpu()
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        self.cpu_s.append(child_cpu() - before)
        if done.returncode:
            raise SystemExit(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def rows(self, samples: list[int], names: list[str]) -> dict[str, torch.Tensor]:
        """The last run's stored gradients of `samples`, read back from its lake."""
        from gradlake.lake.store import LakeStore

        spec = spec_for(self.model_dir, f"file://{self.lake}")
        group = GradientGroup.open(LakeStore(spec.lake), plan_extraction(spec).path)
        return {n: torch.from_numpy(np.asarray(group.array(n)[samples])) for n in names}


class BergsonDisk:
    """Bergson's `GradientCollector` writing every sample's gradient to its on-disk index (a memory-mapped file), with
    the batches and settings of the in-memory collector in peers.py; a fresh run directory each time."""

    def __init__(self, model, data, batches: list[list[int]], root: Path, trainable: Callable[[], None]):
        self.model, self.data, self.batches, self.root, self.trainable, self.rounds = model, data, batches, root, trainable, 0

    def prepare(self) -> None:
        from bergson import IndexConfig

        shutil.rmtree(self.root / f"bergson-{self.rounds - 1}", ignore_errors=True)
        self.cfg = IndexConfig(str(self.root / f"bergson-{self.rounds}"), loss_reduction="mean", projection_dim=0)
        self.cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        self.rounds += 1

    def run(self) -> None:
        import logging

        from bergson import GradientCollector, GradientProcessor
        from bergson.collector.collector import CollectorComputer

        self.trainable()
        processor = GradientProcessor(projection_dim=None, include_bias=self.cfg.include_bias)
        logging.disable(logging.INFO)
        try:
            collector = GradientCollector(model=self.model, data=self.data, cfg=self.cfg, processor=processor)
            computer = CollectorComputer(self.model, self.data, collector=collector, batches=self.batches, cfg=self.cfg)
        finally:
            logging.disable(logging.NOTSET)
        computer.logger.setLevel(logging.WARNING)
        computer.run_with_collector_hooks()
        self.grad_sizes = {name: int(np.prod(s)) for name, s in collector.shapes().items()}

    def rows(self, samples: list[int]) -> dict[str, torch.Tensor]:
        """The last run's gradients of `samples`, read back from its index, keyed by module name."""
        from bergson.data import column_offsets, load_gradients

        grads = load_gradients(self.cfg.partial_run_path)
        return {m: torch.from_numpy(np.array(grads[samples, a:b])) for m, (a, b) in column_offsets(self.grad_sizes).items()}
