"""A published attribution protocol end to end through the platform, from one JSON spec.

A `ProtocolSpec` names every stage of a study: the datasets (training and query sets), the
training run, the influence computations and the attribution benchmark that scores them
against retraining.  ``run-protocol`` creates the datasets, estimates what the rest costs
(logged before any training: FLOPs and GPU-hours at a stated throughput), then trains,
computes influence and runs the benchmark, each stage the platform's own flow, so a
killed run resumes where it stopped and every result lands in the lake with its lineage.

``protocols/kronfluence-gpt2-wikitext2.json`` reproduces Kronfluence's GPT-2 / WikiText-2
example (Bae et al., 2024; ``examples/wikitext`` of the Kronfluence repository): GPT-2
small fine-tuned for 3 epochs on WikiText-2 (raw) cut into 512-token blocks, AdamW at a
constant 3e-5 with weight decay 0.01, batch 8, seed 1004; EK-FAC (and identity) influence
on the attention and MLP projections of blocks 0-10 with Kronfluence's default damping;
the validation blocks as held-out queries; LDS over 100 random halves of the training set
with 5 retrainings each.
"""

from __future__ import annotations

from prefect import flow

from gradlake.flows.attribution import evaluate_attribution
from gradlake.flows.dataset import create_dataset
from gradlake.flows.influence import compute_influence_flow
from gradlake.flows.train import train_model
from gradlake.tasks.attribution.protocol import INFLUENCE_DEPLOYMENT, ProtocolSpec, plan_protocol_task


def on_gpu_pool(spec: ProtocolSpec, deployment: str, label: str, parameters: dict) -> None:
    """One run of a gpu-pool deployment, waited on (a finished one is found and skipped by its own flow)."""
    from prefect import runtime

    from gradlake.flows.fanout import run_each_on_pool

    attribution = spec.attribution
    run_each_on_pool(deployment, [(f"{spec.name} {label}", parameters, f"{runtime.flow_run.id}:{label}")],
                     attribution.run_timeout_s, attribution.worker_wait_s, what=label,
                     rerun="rerun the protocol: finished stages are found in the lake and skipped")


@flow(name="run-protocol", log_prints=True)
def run_protocol(spec: ProtocolSpec) -> dict:
    """Datasets, the cost estimate, training, influence, the benchmark; returns the benchmark's directory and the cost.

    With the benchmark's `train_deployment` set, training and influence run on the gpu pool through the
    train-model and compute-influence deployments (this run, on the cpu pool, waits); empty: all in this run.
    """
    for dataset in spec.datasets:
        create_dataset(dataset)
    cost = plan_protocol_task(spec)
    remote = spec.attribution.train_deployment is not None
    if remote:
        on_gpu_pool(spec, spec.attribution.train_deployment, "training",
                    {"spec": spec.attribution.train.model_dump(mode="json")})
    else:
        train_model(spec.attribution.train)
    for index, influence in enumerate(spec.influence):
        influence = influence.model_copy(update={"model": spec.attribution.model})
        if remote:
            on_gpu_pool(spec, INFLUENCE_DEPLOYMENT, f"influence-{index}-{influence.strategy}",
                        {"spec": influence.model_dump(mode="json")})
        else:
            compute_influence_flow(influence)
    directory = evaluate_attribution(spec.attribution)
    return {"benchmark": directory, "cost": cost}


if __name__ == "__main__":
    run_protocol.serve(name="run-protocol")
