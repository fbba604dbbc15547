"""Influence through the lake against Kronfluence in memory, and an LDS subset run against an extraction, in one run.

Part 1, influence.  On the same random-weight OLMo-2, the same probe chats and the same
settings, gradlake's lake-backed path (``compute_influence``: reads the chats from a lake,
fits the factors, copies them into the lake, writes the scores block by block into the
lake) is run against Kronfluence called directly, in memory (``prepare_model``,
``Analyzer.fit_all_factors``, ``compute_pairwise_scores``, ``load_pairwise_scores``) with
gradlake's own task, collate function, tracked modules and factor/score arguments, so
that the two do the same numerical work.  Every round uses a fresh lake and a fresh
Kronfluence folder, so nothing is reused unless asked: gradlake runs once fresh (fits
and scores) and once more on the same lake under another method name ("factors
reused": the factors come from the lake, the scores are computed again).  Printed per
phase, the median seconds of each and their ratio gradlake/direct:

- setup: gradlake's planning, lake reads, tokenizing and model loading (the call's wall
  time less the compute seconds it records); direct: tokenizer, encoding, model loading,
  ``prepare_model`` and the Analyzer;
- factors: gradlake's recorded ``fit_seconds`` (Analyzer, fit, copy into the lake);
  direct: ``fit_all_factors``;
- scores: gradlake's ``compute_seconds - fit_seconds`` (scores plus block writes);
  direct: ``compute_pairwise_scores`` plus ``load_pairwise_scores`` (factors read back
  from Kronfluence's folder);
- end to end, fresh and with the factors reused (direct: setup + scores).

Peak memory is the largest working set above the level before the model is loaded
(gradlake: the call; direct: its setup, fit and scores measured apart, each counted from
the start of its setup): on CPU the process's peak resident set (VmHWM, reset through
``/proc/self/clear_refs`` after ``malloc_trim``; tracemalloc would miss torch's
allocations), on CUDA ``torch.cuda.max_memory_allocated``.  The two score matrices are
compared (largest absolute difference, Pearson correlation) and so are the factors.

Part 2, LDS.  The ground truth (linear datamodeling score) retrains the model on many
random halves of the training set; printed is what one such run costs
(``TrainSpec(keep=half)``, ``plan_run`` + ``train``, final checkpoint written) against
one extraction of the whole training set's per-sample gradients of the same layers
(``plan_extraction``, ``create_group``, ``extract_shard`` per shard, finalize: the body of
the ``extract_gradients`` flow without Prefect), as a ratio, also per epoch.

Each part's paths run interleaved, their order alternating from round to round, and the
median round is reported, so that load from other processes hits them alike.  Only
ratios measured here, now, are meaningful; the seconds are for scale.

    python benchmarks/influence.py                        # small OLMo-2, 64 chats x 16 queries, EK-FAC, CPU
    python benchmarks/influence.py --strategy kfac
    python benchmarks/influence.py --shape medium --device cuda --samples 160 --queries 32 --epochs 5
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Kronfluence imports torch.cuda.amp.GradScaler, deprecated in torch: one FutureWarning per use.
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*GradScaler.*")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradlake.lake.scores import ScoreGroup  # noqa: E402
from gradlake.lake.store import LakeStore  # noqa: E402
from gradlake.tasks.influence.spec import STRATEGIES, InfluenceSpec
from gradlake.tasks.influence.kronfluence import (EncodedSet, factor_args, score_args, task_class, collate, load_factors,
    tracked_modules)
from gradlake.tasks.influence.compute import compute_influence
from gradlake.tasks.common.loss import encode_sample  # noqa: E402
from gradlake.tasks.common.model import ModelSpec  # noqa: E402
from gradlake.tasks.data.probes import load_probe_set, probe_variant, store_probe_set  # noqa: E402

DATASET = "probe"
# (tokenizer vocabulary asked for, overrides of gradlake.tasks.training.tiny.tiny_config: OLMo-2, random weights)
SHAPES = {
    "tiny": (512, {}),  # the tests' models: 2 layers, width 64, MLP 128
    "small": (1024, dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4)),
    "medium": (4096, dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8)),
}


def quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- measuring

def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_host_peak() -> bool:
    """Give freed heap back to the system and restart the peak resident set at the current one (Linux)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Section:
    """Seconds and memory (bytes, absolute: at the start and the highest reached; None where not measurable)."""

    seconds: float = 0.0
    base: int | None = None
    high: int | None = None

    @property
    def peak(self) -> int | None:
        """The highest use above the start of this section."""
        return self.above(self)

    def above(self, start: "Section") -> int | None:
        """The highest use in this section above the start of `start` (an earlier section of the same sequence)."""
        return None if self.high is None or start.base is None else self.high - start.base


@contextlib.contextmanager
def measured(device: torch.device):
    section = Section()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        section.base = torch.cuda.memory_allocated(device)
    elif _reset_host_peak():
        kib = _status_kib("VmRSS")
        section.base = None if kib is None else kib * 1024
    start = time.perf_counter()
    try:
        yield section
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        section.seconds = time.perf_counter() - start
        if device.type == "cuda":
            section.high = torch.cuda.max_memory_allocated(device)
        elif section.base is not None:
            kib = _status_kib("VmHWM")
            section.high = None if kib is None else kib * 1024


# ---------------------------------------------------------------- inputs

@dataclass
class Inputs:
    model: ModelSpec
    directory: Path
    n_params: int
    train_ids: list[str]
    train_chats: list[list[dict]]
    query_ids: list[str]
    query_chats: list[list[dict]]
    layers: list[str]
    lengths: list[int] = field(default_factory=list)


def build_model(root: Path, shape: str, chats: list[list[dict]], device: str) -> tuple[ModelSpec, int]:
    """A random-weight OLMo-2 of `shape` and a BPE tokenizer trained on the chats, saved as `root/checkpoint-0`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from gradlake.tasks.training.tiny import tiny_config, train_tokenizer

    transformers_logging.disable_progress_bar()  # every save_pretrained here (and in training) would draw one

    vocab, overrides = SHAPES[shape]
    tokenizer = train_tokenizer((m["content"] for chat in chats for m in chat), vocab_size=vocab)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("olmo2", tokenizer, **overrides), dtype=torch.float32)
    model.save_pretrained(root / "checkpoint-0")
    tokenizer.save_pretrained(root / "checkpoint-0")
    return (ModelSpec(model=str(root), checkpoint="checkpoint-0", device=device),
            sum(p.numel() for p in model.parameters()))


def fresh_lake(scratch: Path, name: str, n: int) -> str:
    lake = scratch / name
    store_probe_set(str(lake), DATASET, n)
    return str(lake)


# ---------------------------------------------------------------- part 1: influence

def influence_spec(args, inputs: Inputs, lake: str, method: str | None = None) -> InfluenceSpec:
    return InfluenceSpec(model=inputs.model, lake=lake, dataset=DATASET, queries="paraphrased",
                         max_queries=args.queries, strategy=args.strategy, layers=inputs.layers,
                         max_length=args.max_length, train_batch_size=args.batch, query_batch_size=args.batch,
                         paradigm="sft", seed=0, method=method)


def through_the_lake(spec: InfluenceSpec, device: torch.device) -> dict:
    """gradlake's compute_influence, end to end; its phases from the seconds it records in the score group."""
    with measured(device) as section:
        path = compute_influence(spec, log=quiet)
    store = LakeStore(spec.lake)
    group = ScoreGroup.open(store, path)
    meta = group.meta
    fit, compute = meta["fit_seconds"], meta["compute_seconds"]
    return {"total": section.seconds, "setup": section.seconds - compute, "factors": fit, "scores": compute - fit,
            "peak": section.peak, "matrix": group.read(), "train": group.train_ids(), "query": group.query_ids(),
            "factors_dir": meta["lineage"]["factors"], "lake_bytes": meta["lake_bytes"]}


def in_memory(spec: InfluenceSpec, inputs: Inputs, folder: Path, device: torch.device) -> dict:
    """Kronfluence called directly on chats held in memory, with gradlake's task and arguments."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = inputs.directory / "checkpoint-0"
    with measured(device) as setup:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        train = EncodedSet([encode_sample(tokenizer, c, spec.paradigm, spec.max_length) for c in inputs.train_chats])
        queries = EncodedSet([encode_sample(tokenizer, c, spec.paradigm, spec.max_length) for c in inputs.query_chats])
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
        task = task_class()(tracked_modules(model, spec.layers), spec.seed)
        model = prepare_model(model, task)
        analyzer = Analyzer(analysis_name="direct", model=model, task=task, cpu=device.type == "cpu",
                            output_dir=str(folder), disable_tqdm=True, log_level=30)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate(tokenizer.pad_token_id)))
    with measured(device) as fit:
        torch.manual_seed(spec.seed)
        analyzer.fit_all_factors(factors_name="factors", dataset=train, per_device_batch_size=spec.train_batch_size,
                                 factor_args=factor_args(spec))
    with measured(device) as score:
        analyzer.compute_pairwise_scores(scores_name="scores", factors_name="factors", query_dataset=queries,
                                         train_dataset=train, per_device_query_batch_size=spec.query_batch_size,
                                         per_device_train_batch_size=spec.train_batch_size,
                                         score_args=score_args(spec))  # returns None: the scores are on disk
        matrix = analyzer.load_pairwise_scores("scores")["all_modules"].float().cpu().numpy()
    factors = analyzer.load_all_factors("factors")
    # like gradlake's, every peak counts from before the model was loaded (the phases are measured apart)
    peaks = [s.above(setup) for s in (setup, fit, score)]
    return {"setup": setup.seconds, "factors": fit.seconds, "scores": score.seconds,
            "total": setup.seconds + fit.seconds + score.seconds,
            "peak_setup": peaks[0], "peak_fit": peaks[1], "peak_score": peaks[2],
            "peak": None if None in peaks else max(peaks),
            "peak_reused": None if None in peaks else max(peaks[0], peaks[2]),
            "matrix": matrix, "factors_tensors": factors}


def factors_difference(store: LakeStore, lake_dir: str, direct: dict) -> float:
    """Largest absolute difference between the factors in the lake and Kronfluence's own (inf if they differ in kind)."""
    stored = load_factors(store, lake_dir)
    worst = 0.0
    for kind, per_module in direct.items():
        for module, tensor in per_module.items():
            other = stored.get(kind, {}).get(module)
            if other is None or other.shape != tensor.shape:
                return float("inf")
            worst = max(worst, float((other.double() - tensor.double().cpu()).abs().max()))
    return worst


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(max |a - b|, that over max |b|, Pearson r over all entries)."""
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(b).max()) or 1.0
    r = float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])
    return diff, diff / scale, r


# ---------------------------------------------------------------- part 2: an LDS subset run against an extraction

def subset_run(args, inputs: Inputs, lake: str, output: Path, device: torch.device) -> Section:
    from gradlake.tasks.training.spec import TrainSpec
    from gradlake.tasks.training.plan import plan_run
    from gradlake.tasks.training.train import train

    keep = inputs.train_ids[::2]  # half of the samples, as the LDS draws them
    spec = TrainSpec(model=inputs.model, lake=lake, dataset=DATASET, output=str(output), epochs=args.epochs,
                     batch_size=args.batch, learning_rate=1e-3, warmup_steps=0, max_length=args.max_length,
                     keep=keep, seed=0, quality=None)
    with measured(device) as section:
        train(plan_run(spec), log=quiet)
    return section


def extraction(args, inputs: Inputs, lake: str, device: torch.device) -> Section:
    from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
    from gradlake.tasks.gradients.extract import extract_shard, pending_shards

    spec = ExtractionSpec(model=inputs.model, dataset=DATASET, variant="original", paradigm="sft",
                          layers=inputs.layers, max_length=args.max_length, batch_size=args.batch,
                          shard_size=args.batch * max(1, 64 // args.batch), lake=lake)
    with measured(device) as section:
        group = create_group(plan_extraction(spec))
        for shard in pending_shards(spec, group):
            extract_shard(spec, group, shard, log=quiet)
        if not group.finalize():
            raise RuntimeError(f"extraction into {lake} left chunks unwritten")
    return section


# ---------------------------------------------------------------- one round

def influence_round(args, inputs: Inputs, scratch: Path, index: int, device: torch.device, direct_first: bool) -> dict:
    lake = fresh_lake(scratch, f"lake-influence-{index}", args.samples)
    folder = scratch / f"kronfluence-{index}"
    out: dict = {}

    def lake_path():
        out["fresh"] = through_the_lake(influence_spec(args, inputs, lake), device)
        # the same lake again under another method name: the factors are found there, the scores are new
        out["reused"] = through_the_lake(influence_spec(args, inputs, lake, f"influence-{args.strategy}-again"),
                                         device)

    def direct_path():
        out["direct"] = in_memory(influence_spec(args, inputs, lake), inputs, folder, device)

    for step in ((direct_path, lake_path) if direct_first else (lake_path, direct_path)):
        step()
    out["factor_diff"] = factors_difference(LakeStore(lake), out["fresh"]["factors_dir"],
                                            out["direct"].pop("factors_tensors"))
    shutil.rmtree(lake, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def lds_round(args, inputs: Inputs, scratch: Path, index: int, device: torch.device, extract_first: bool) -> dict:
    lake = fresh_lake(scratch, f"lake-lds-{index}", args.samples)
    output = scratch / f"run-{index}"
    out: dict = {}

    def run():
        out["train"] = subset_run(args, inputs, lake, output, device)

    def extract():
        out["extract"] = extraction(args, inputs, lake, device)

    for step in ((extract, run) if extract_first else (run, extract)):
        step()
    shutil.rmtree(lake, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    return out


# ---------------------------------------------------------------- report

def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small", help="OLMo-2 size (random weights)")
    parser.add_argument("--samples", type=int, default=64, help="training samples: the probe set's first this many chats")
    parser.add_argument("--queries", type=int, default=16, help="queries: the paraphrases of the first this many")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ekfac")
    parser.add_argument("--layers", default="model.layers.*.mlp.*.weight",
                        help="glob over weight names (influence tracks these nn.Linear; extraction takes these); "
                             "'' for every nn.Linear / parameter")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per chat at most")
    parser.add_argument("--batch", type=int, default=8, help="samples per pass in every path")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the LDS subset run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's own choice")
    parser.add_argument("--skip-lds", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.samples <= len(load_probe_set()):
        parser.error(f"--samples must be 1..{len(load_probe_set())} (the bundled probe set's size)")
    if not 1 <= args.queries <= args.samples:
        parser.error("--queries must be 1..--samples (queries are paraphrases of training chats)")
    device = torch.device(args.device)

    frame = load_probe_set().head(args.samples)
    originals, paraphrases = probe_variant(frame, "original"), probe_variant(frame, "paraphrased").head(args.queries)
    scratch = Path(tempfile.mkdtemp(prefix="gradlake-bench-influence-"))
    try:
        spec_model, n_params = build_model(scratch / "model", args.shape, list(originals["messages"]), args.device)
        inputs = Inputs(model=spec_model, directory=scratch / "model", n_params=n_params,
                        train_ids=[str(i) for i in originals["id"]], train_chats=list(originals["messages"]),
                        query_ids=[str(i) for i in paraphrases["id"]], query_chats=list(paraphrases["messages"]),
                        layers=[args.layers] if args.layers else [])
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(inputs.directory / "checkpoint-0")
        inputs.lengths = [len(encode_sample(tokenizer, c, "sft", args.max_length).input_ids) for c in inputs.train_chats]
        report(args, inputs, scratch, device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(args, inputs: Inputs, scratch: Path, device: torch.device) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(inputs.directory / "checkpoint-0"))
    modules = tracked_modules(skeleton, inputs.layers)
    memory = ("peak CUDA memory allocated above the start" if device.type == "cuda" else
              "peak resident set above the start" if _reset_host_peak() else
              "no per-section peak on this system (needs /proc/self/clear_refs)")
    lengths = inputs.lengths
    print(f"model {args.shape}: Olmo2ForCausalLM, random weights, {inputs.n_params / 1e6:.2f}M parameters; "
          f"float32 on {device} ({torch.get_num_threads()} CPU threads)")
    print(f"data: {args.samples} probe chats (original) x {args.queries} queries (paraphrased), "
          f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}), sft loss, batch {args.batch}")
    print(f"tracked: {len(modules)} nn.Linear modules ({args.layers or 'all'}); strategy {args.strategy}, true Fisher; "
          f"median of {args.rounds} interleaved rounds, a fresh lake each; memory: {memory}", flush=True)

    # warm-up: every path once on a few samples, so that first-call costs (imports, lazy init) hit none of the rounds
    warm = argparse.Namespace(**{**vars(args), "samples": min(8, args.samples), "queries": min(2, args.queries),
                                 "epochs": 1})
    warm_inputs = Inputs(**{**inputs.__dict__, "train_ids": inputs.train_ids[:warm.samples],
                            "train_chats": inputs.train_chats[:warm.samples],
                            "query_ids": inputs.query_ids[:warm.queries],
                            "query_chats": inputs.query_chats[:warm.queries]})
    influence_round(warm, warm_inputs, scratch, -1, device, False)
    if not args.skip_lds:
        lds_round(warm, warm_inputs, scratch, -1, device, False)

    rounds, lds = [], []
    for index in range(args.rounds):
        rounds.append(influence_round(args, inputs, scratch, index, device, direct_first=index % 2 == 1))
        if not args.skip_lds:
            lds.append(lds_round(args, inputs, scratch, index, device, extract_first=index % 2 == 1))

    fresh = [r["fresh"] for r in rounds]
    reused = [r["reused"] for r in rounds]
    direct = [r["direct"] for r in rounds]
    expected_train = [f"original:{i}" for i in inputs.train_ids]
    if fresh[0]["train"] != expected_train or fresh[0]["query"] != inputs.query_ids:
        raise RuntimeError("the lake's sample order differs from the in-memory order; the score matrices would not line up")

    def row(label: str, g: float | None, d: float | None, unit: str = "s") -> None:
        if unit == "s":
            gs, ds = ("n/a" if g is None else f"{g:.2f} s"), ("n/a" if d is None else f"{d:.2f} s")
        else:
            gs, ds = mib(g), mib(d)
        print(f"  {label:50s} {gs:>15s} {ds:>15s} {ratio(g, d):>15s}")

    print()
    print(f"{'influence (' + args.strategy + ')':52s} {'gradlake (lake)':>15s} {'direct (memory)':>15s} "
          f"{'gradlake/direct':>15s}")
    row("setup (plan, read, tokenize, load model)", med([f["setup"] for f in fresh]), med([d["setup"] for d in direct]))
    row("factors (gradlake: fit + copy into lake)", med([f["factors"] for f in fresh]), med([d["factors"] for d in direct]))
    row("scores (gradlake: + block writes)", med([f["scores"] for f in fresh]), med([d["scores"] for d in direct]))
    row("scores, factors reused from the lake", med([r["scores"] for r in reused]), med([d["scores"] for d in direct]))
    row("end to end, fresh", med([f["total"] for f in fresh]), med([d["total"] for d in direct]))
    row("end to end, factors reused (direct: setup+scores)", med([r["total"] for r in reused]),
        med([d["setup"] + d["scores"] for d in direct]))
    row("peak memory, fresh (direct: max of phases)", med([f["peak"] for f in fresh]), med([d["peak"] for d in direct]),
        unit="mem")
    row("peak memory, factors reused (direct: setup+scores)", med([r["peak"] for r in reused]),
        med([d["peak_reused"] for d in direct]), unit="mem")
    print(f"  direct's phases, peak memory above its start: setup {mib(med([d['peak_setup'] for d in direct]))}, "
          f"factors {mib(med([d['peak_fit'] for d in direct]))}, scores {mib(med([d['peak_score'] for d in direct]))}")
    worst = max((agreement(r["fresh"]["matrix"], r["direct"]["matrix"]) for r in rounds), key=lambda a: a[0])
    again = max(float(np.abs(r["reused"]["matrix"] - r["fresh"]["matrix"]).max()) for r in rounds)
    factor_diff = max(r["factor_diff"] for r in rounds)
    print(f"  scores lake vs direct ({args.queries} x {args.samples}): max |diff| {worst[0]:.3g} "
          f"({worst[1]:.2g} of max |score|), Pearson r {worst[2]:.6f}; factors max |diff| {factor_diff:.3g}; "
          f"reused vs fresh scores max |diff| {again:.3g}")
    print(f"  in the lake: factors + scores {fresh[0]['lake_bytes'] / 2**20:.2f} MiB")

    if lds:
        train_s, extract_s = med([x["train"].seconds for x in lds]), med([x["extract"].seconds for x in lds])
        print()
        print(f"LDS subset run against extraction ({len(inputs.train_ids[::2])} of {args.samples} samples, "
              f"{args.epochs} epochs, batch {args.batch}, lr 1e-3; extraction of all {args.samples}, layers "
              f"{args.layers or 'all'})")
        print(f"  subset training run (plan_run + train, final checkpoint): {train_s:7.2f} s   peak "
              f"{mib(med([x['train'].peak for x in lds]))}")
        print(f"  extraction of the full training set:                     {extract_s:7.2f} s   peak "
              f"{mib(med([x['extract'].peak for x in lds]))}")
        print(f"  subset run / extraction: {train_s / extract_s:.2f}x  "
              f"(per epoch of the subset: {train_s / extract_s / args.epochs:.2f}x)")


if __name__ == "__main__":
    main()
