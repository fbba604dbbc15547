"""Run names: a name a person gave a run (the run form's name field, `run_deployment(flow_run_name=...)`) is kept;
a name Prefect made up is replaced by the model-and-checkpoint label."""

from __future__ import annotations

import pytest
from prefect import flow
from pydantic import BaseModel

from gradlake.flows.run_names import named_by_model, run_label
from gradlake.tasks.common.model import ModelSpec


class _Spec(BaseModel):
    model: ModelSpec


@flow(name="run-names-probe", flow_run_name=named_by_model(_Spec, lambda s: "probe", "run-names-probe"))
def _named(spec: _Spec) -> str:
    return "done"


def _run(spec: _Spec, name: str | None) -> str:
    """Create the run on the server (named as a form or an API call would), execute it as a worker does, read its name."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_named, parameters={"spec": spec.model_dump(mode="json")}, name=name)
        run_flow(_named, flow_run=run, parameters={"spec": spec})
        return client.read_flow_run(run.id).name


def test_a_given_name_is_kept_and_a_made_up_one_replaced(tiny_models):
    spec = _Spec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"))
    label = run_label(spec.model, "probe")
    assert _run(spec, "lima ablation, lr 3e-4") == "lima ablation, lr 3e-4"
    assert _run(spec, "first-run") == "first-run"
    assert _run(spec, None) == label                # the server's slug, e.g. 'cobalt-stingray'
    assert _run(spec, "Sleek-Addax") == label       # what the V2 UI's run form fills in
    assert _run(spec, "gamma2-joule") == label      # and the V1 UI's


@pytest.mark.parametrize("name", ["Tasty-Lion", "Handcrafted-Yak", "alpha42-andromedae-nebula", "beta-canis-majoris",
                                  "omega7-newton"])
def test_the_run_forms_names_are_recognised(name):
    from gradlake.flows.run_names import prefect_made_up

    assert prefect_made_up(name)


def test_every_server_slug_is_recognised_and_a_persons_name_is_not():
    from prefect.utilities.names import generate_slug

    from gradlake.flows.run_names import prefect_made_up

    assert all(prefect_made_up(generate_slug(2)) for _ in range(2000))
    for name in ("first-run", "my-first-run", "baseline", "lima ablation 3", "run-1", "olmo-sweep", "tiny-olmo2 probe"):
        assert not prefect_made_up(name), name
