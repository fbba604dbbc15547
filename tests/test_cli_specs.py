"""The command line is the specs: each stage command's options are its spec's fields (and its own few), with their help.

The expected options are computed here from the specs by a walk of their fields independent of
`flows/commands.py`: every field of the spec, nested models flattened (an optional one also counts
itself, its on/off switch), is exactly one option, and nothing else is, but `--spec` and the
command's own options.
"""

from __future__ import annotations

import json
import re
import types
import typing

import pytest
from pydantic import BaseModel
from typer.main import get_command
from typer.testing import CliRunner

from gradlake.flows.cli import app
from gradlake.flows.commands import SpecCommand, merged, spec_flags

runner = CliRunner()
# every command that runs a stage with a spec, and its options besides the spec's
STAGE_COMMANDS = {"extract": set(), "project": set(), "dataset create": set(), "evaluate": set(), "train": set(),
                  "influence": set(), "attribution": set(), "protocol": {"plan"}, "trace": set(),
                  "watch": {"interval", "off"}, "pipeline": set(), "verify": set(), "demo": {"lake", "full"},
                  "score": set()}
# commands that run no stage and so have no spec: they only read a lake, or write the bundled probe set
WITHOUT_SPEC = {"catalog": {"lake"}, "dataset probe": {"lake"}}


def test_every_command_is_made_from_its_spec_or_has_none():
    found = commands()
    assert set(found) == set(STAGE_COMMANDS) | set(WITHOUT_SPEC)
    for words, options in WITHOUT_SPEC.items():
        assert {param.name for param in found[words].params} == options, words


def commands() -> dict[str, object]:
    """Every command of `gradlake`, by its words ('dataset create')."""
    found = {}

    def walk(group, words):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, [*words, name])
            else:
                found[" ".join([*words, name])] = command

    walk(get_command(app), [])
    return found


def field_paths(model: type[BaseModel], each: dict[str, str], path: tuple[str, ...] = ()) -> set[str]:
    """Dotted paths of the fields the command line sets: nested models flattened (an optional one is also its
    own on/off switch); a list of models named in `each` flattened into its item's fields."""
    out = set()
    for name, info in model.model_fields.items():
        here = (*path, name)
        args = typing.get_args(info.annotation) if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) \
            else (info.annotation,)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            if type(None) in args:
                out.add(".".join(here))
            out |= field_paths(models[0], each, here)
        elif ".".join(here) in each:
            out |= {".".join((*here, sub)) for sub in typing.get_args(info.annotation)[0].model_fields}
        else:
            out.add(".".join(here))
    return out


def field_info(model: type[BaseModel], key: str):
    """The FieldInfo at a dotted path (through optional models and lists of models)."""
    info = None
    for part in key.split("."):
        info = model.model_fields[part]
        inner = [a for a in (typing.get_args(info.annotation) or (info.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        inner += [a for b in typing.get_args(info.annotation) for a in typing.get_args(b)
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else None
    return info


@pytest.mark.parametrize("words", sorted(STAGE_COMMANDS))
def test_a_stage_command_has_one_option_per_field_of_its_spec_and_no_other(words):
    command = commands()[words]
    assert isinstance(command, SpecCommand), f"`gradlake {words}` is not made from its spec"
    declaration = command.declaration
    spec = declaration.spec_class()
    fields = field_paths(spec, declaration.each)
    by_dest = {flag.dest: flag.key for flag in declaration.flags()}
    options = {param.name for param in command.params}
    assert options - set(by_dest) == {"spec"} | STAGE_COMMANDS[words], "options that set no field"
    set_fields = sorted(by_dest[name] for name in options if name in by_dest)
    assert len(set_fields) == len(set(set_fields)), "a field with two options"
    assert set(set_fields) == fields, (f"fields without an option: {sorted(fields - set(set_fields))}; "
                                       f"options of no field: {sorted(set(set_fields) - fields)}")
    for param in command.params:  # each option's help is its field's description
        if param.name in by_dest:
            info = field_info(spec, by_dest[param.name])
            assert info.description, f"{spec.__name__}.{by_dest[param.name]} has no description"
            assert param.help.replace("\\[", "[").startswith(info.description), param.name


def plain(text: str) -> str:
    """Help text without its wrapping (which may break a word after a hyphen)."""
    return re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text))


def shown_default(info, flag: str) -> str | None:
    """How the help should show a field's default (None: not shown)."""
    value = info.get_default(call_default_factory=True, validated_data={})
    if info.is_required() or value is None or value == []:
        return None
    if isinstance(value, bool) or isinstance(value, BaseModel):
        return flag if value else f"no-{flag}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return None if len(str(value)) > 60 else str(value)


@pytest.mark.parametrize("words", ["extract", "train", "attribution", "dataset create"])
def test_help_shows_each_fields_description_and_default(words):
    command = commands()[words]
    spec = command.declaration.spec_class()
    result = runner.invoke(app, [*words.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    for flag in command.declaration.flags():
        info = field_info(spec, flag.key)
        assert plain(info.description)[:40] in text, f"--{flag.name}: its description is not in the help"
        default = shown_default(info, flag.name)
        if default is not None and flag.kind != "switch":
            assert f"[default: {default}]" in text, f"--{flag.name}: its default {default!r} is not in the help"
    assert "--spec" in text


TRAIN = {"model": {"model": "amd-olmo-1b-sft", "checkpoint": "main"}, "lake": "s3://lake/here", "dataset": "probe",
         "output": "/runs/one", "steps": 5, "learning_rate": 1e-4, "quality": None}


@pytest.fixture
def trained(monkeypatch) -> list:
    """`gradlake train` with its plan and flow replaced by a record of the spec they were given."""
    seen = []
    monkeypatch.setattr("gradlake.tasks.training.plan.plan_run", seen.append)
    from prefect.states import Completed

    monkeypatch.setattr("gradlake.flows.train.train_model", lambda spec, return_state=False: Completed(data=["trained"]))
    return seen


def test_spec_file_and_an_option_merge_into_one_validated_spec(tmp_path, trained):
    from gradlake.tasks.training.spec import TrainSpec

    (tmp_path / "train.json").write_text(json.dumps(TRAIN))
    result = runner.invoke(app, ["train", "--spec", f"@{tmp_path / 'train.json'}", "--learning-rate", "0.001",
                                 "--checkpoint", "step-2", "--save-steps", "2", "--save-steps", "4"])
    assert result.exit_code == 0, result.output
    [spec] = trained
    expected = TrainSpec.model_validate({**TRAIN, "learning_rate": 0.001, "save_steps": [2, 4],
                                         "model": {"model": "amd-olmo-1b-sft", "checkpoint": "step-2"}})
    assert spec == expected and spec.quality is None  # the file's values, the options over them


def test_options_alone_make_the_spec_as_the_file_would(trained):
    args = ["train", "--model", "amd-olmo-1b-sft", "--checkpoint", "main", "--lake", "s3://lake/here", "--dataset", "probe",
            "--output", "/runs/one", "--steps", "5", "--learning-rate", "1e-4", "--no-quality"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert trained[0].model_dump() == type(trained[0]).model_validate(TRAIN).model_dump()


@pytest.mark.parametrize("args, said", [
    (["--schedule", "wavy"], "schedule (--schedule): Input should be 'constant', 'linear' or 'cosine' (got 'wavy')"),
    (["--epochs", "0"], "epochs (--epochs): Input should be greater than or equal to 1 (got '0')"),
    (["--dtype", "float64"], "model.dtype (--dtype): Input should be 'float32', 'bfloat16' or 'float16' (got 'float64')"),
    (["--quality-max-samples", "none", "--quality-judge-timeout-s", "-1"], "quality.judge.timeout_s (--quality-judge-timeout-s)"),
])
def test_a_bad_value_is_one_line_naming_it_and_what_is_accepted(tmp_path, trained, args, said):
    (tmp_path / "train.json").write_text(json.dumps(TRAIN))
    result = runner.invoke(app, ["train", "--spec", f"@{tmp_path / 'train.json'}", *args])
    assert result.exit_code == 2 and not trained, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("spec, said", [("@/no/such.json", "no file /no/such.json"), ("{nope", "--spec is not JSON"),
                                        ("[1]", "must be a JSON object"),
                                        (json.dumps({**TRAIN, "epoch": 2}), "epoch: Extra inputs are not permitted")])
def test_a_bad_spec_document_is_one_line(trained, spec, said):
    result = runner.invoke(app, ["train", "--spec", spec])
    assert result.exit_code == 2 and not trained and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_optional_models_switch_on_with_a_field_and_off_with_no():
    flags = commands()["dataset create"].declaration.flags()
    names = {flag.key: flag.name for flag in flags}
    assert names["paraphrase.model"] == "paraphrase-model" and names["source.seed"] == "seed"
    assert names["paraphrase.seed"] == "paraphrase-seed" and names["source.blocks.revision"] == "blocks-revision"
    assert merged({}, flags, {"paraphrase-model": "m"}) == {"paraphrase": {"model": "m"}}
    assert merged({"paraphrase": None}, flags, {"paraphrase": True}) == {"paraphrase": {}}
    assert merged({"paraphrase": {"model": "m"}}, flags, {"paraphrase": False}) == {"paraphrase": None}
    with pytest.raises(ValueError, match="--no-paraphrase turns paraphrase off, but --paraphrase-model"):
        merged({}, flags, {"paraphrase": False, "paraphrase-model": "m"})
    assert merged({"source": {"source": "a", "n": 5}}, flags, {"n": "7", "generate": ["m@c", "n"]}) == \
        {"source": {"source": "a", "n": "7"}, "generate": [{"model": "m", "checkpoint": "c"}, {"model": "n", "checkpoint": None}]}


def test_names_that_clash_are_prefixed_by_the_field_that_holds_them():
    from gradlake.tasks.attribution.spec import AttributionSpec
    from gradlake.tasks.tracing.trace import TraceSpec

    trace = {flag.key: flag.name for flag in spec_flags(TraceSpec)}
    assert (trace["base.model"], trace["candidate.model"], trace["base.dtype"]) == ("base-model", "candidate-model", "base-dtype")
    assert trace["n_samples"] == "n-samples" and trace["lake"] == "lake"
    attribution = {flag.key: flag.name for flag in spec_flags(AttributionSpec)}
    assert (attribution["checkpoint"], attribution["train.model.checkpoint"]) == ("checkpoint", "model-checkpoint")
    assert attribution["train.quality.judge.model"] == "quality-judge-model"


def test_a_list_of_models_given_each_repeats_its_key():
    from gradlake.flows.watch import WatchSpec

    flags = spec_flags(WatchSpec, each={"models": "model"})
    given = {"model": ["a", "b"], "pattern": r"step\d+", "variants": ["original"], "shard-size": "32"}
    assert merged({}, flags, given) == {"models": [{"model": "a", "pattern": r"step\d+"}, {"model": "b", "pattern": r"step\d+"}],
                                        "pipeline": {"variants": ["original"], "shard_size": "32"}}
    # without the key, the shared fields change every model of the --spec document
    assert merged({"models": [{"model": "a"}]}, flags, {"dtype": "bfloat16"}) == {"models": [{"model": "a", "dtype": "bfloat16"}]}


def test_pipeline_and_extraction_share_one_declaration_and_the_extraction_json_is_unchanged():
    from prefect.utilities.callables import parameter_schema

    from gradlake.flows.pipeline import PipelineSettings, PipelineSpec, pipeline
    from gradlake.tasks.gradients.plan import DEFAULT_TOKEN_BUDGET, ExtractionSettings, ExtractionSpec

    for spec in (PipelineSettings, PipelineSpec, ExtractionSpec):  # inherited, never declared again
        assert issubclass(spec, ExtractionSettings)
        below = spec.__mro__[:spec.__mro__.index(ExtractionSettings)]
        again = {name for cls in below for name in vars(cls).get("__annotations__", {})}
        assert not again & set(ExtractionSettings.model_fields), again
    # the document an extraction always made (lineage and fingerprints are built from these values)
    assert ExtractionSpec(model={"model": "m"}, lake="x").model_dump(mode="json") == {
        "model": {"model": "m", "checkpoint": None, "dtype": "float32", "device": "auto", "trust_remote_code": False,
                  "allow_pickled_weights": False},
        "dataset": "probe", "variant": "original", "paradigm": "sft", "layers": [], "target": "parameters",
        "chat_template": "tokenizer", "labels": "assistant", "mode": "store", "shard_size": 64, "batch_size": 8,
        "token_budget": DEFAULT_TOKEN_BUDGET, "max_length": 1024, "object_mb": 0, "store_dtype": "float32",
        "projections": [], "keep_gradients": True, "lake": "x"}
    spec = PipelineSpec(model={"model": "m", "checkpoint": "c"}, lake="x", dataset="d", layers=["*.mlp.*"], token_budget=None,
                        projections=[{"kind": "sparse", "dim": 64}], keep_gradients=False, object_mb=32, labels="last_assistant")
    assert spec.extraction("paraphrased") == ExtractionSpec(
        model=spec.model, lake="x", dataset="d", variant="paraphrased", layers=["*.mlp.*"], token_budget=None,
        projections=[{"kind": "sparse", "dim": 64}], keep_gradients=False, object_mb=32, labels="last_assistant")
    # the deployment's form: the flow's parameter schema builds, its fields in the order of the form
    schema = parameter_schema(pipeline.fn).model_dump()
    fields = list(schema["definitions"]["PipelineSpec"]["properties"])
    assert fields[:6] == ["model", "lake", "dataset", "create", "variants", "paradigm"], fields


def test_version_and_the_lake_default_are_said():
    from importlib import metadata

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"gradlake {metadata.version('gradlake')}"
    for words in WITHOUT_SPEC:
        shown = plain(CliRunner().invoke(app, [*words.split(), "--help"], env={"COLUMNS": "200"}).output)
        assert "default: $GRADLAKE_LAKE or ./demo-lake" in shown, words


def test_the_command_and_its_flow_plan_once_and_a_change_between_them_is_planned_again(tiny_models, tmp_path, monkeypatch):
    """`gradlake extract` plans to check its inputs, then its flow plans again in the same process: the checkpoint's
    content hash and the dataset's tokens are kept between them (tasks/gradients/plan._kept), and a changed file is not."""
    import shutil

    import numpy as np

    from conftest import write_probe
    from gradlake.tasks.common import model as model_module
    from gradlake.tasks.gradients import plan as plan_module
    from gradlake.tasks.common.model import ModelSpec

    lake, models = f"file://{tmp_path / 'lake'}", shutil.copytree(tiny_models["olmo2"], tmp_path / "model")  # changed below
    write_probe(lake, 8)
    spec = plan_module.ExtractionSpec(model=ModelSpec(model=str(models), checkpoint="checkpoint-1"), lake=lake)
    counted = {"hash": 0, "read": 0}
    for module, name, what in ((plan_module, "resolved_commit", "hash"), (plan_module, "read_dataset", "read")):
        def counting(*args, _real=getattr(module, name), _what=what):
            counted[_what] += 1
            return _real(*args)
        monkeypatch.setattr(module, name, counting)
    plan_module._KEPT.clear()
    first, second = plan_module.plan_extraction(spec), plan_module.plan_extraction(spec)
    assert counted == {"hash": 1, "read": 1}
    assert first.lineage == second.lineage and first.sample_ids == second.sample_ids and first.path == second.path
    assert np.array_equal(first.input_ids, second.input_ids) and np.array_equal(first.label_mask, second.label_mask)
    fresh = plan_module._tokenized(first.store, spec, plan_module.dataset_meta(first.store, "probe", "original"),
                                   model_module.load_tokenizer(spec.model.resolved()), None, first.lineage["max_length"])
    assert np.array_equal(fresh[1], first.input_ids) and fresh[0] == first.sample_ids  # what is kept is what is computed
    assert counted == {"hash": 1, "read": 2}

    config = models / "checkpoint-1" / "config.json"
    config.write_text(config.read_text() + "\n")  # the checkpoint changed between two plans: hashed and tokenized again
    changed = plan_module.plan_extraction(spec)
    assert counted == {"hash": 2, "read": 3} and changed.lineage["resolved_commit"] != first.lineage["resolved_commit"]
    write_probe(lake, 4)  # a new version of the dataset: read and tokenized again
    smaller = plan_module.plan_extraction(spec)
    assert counted == {"hash": 2, "read": 4} and len(smaller.sample_ids) == 4


def test_the_deferred_iri_grammar_answers_as_jsonschemas_and_builds_only_when_asked(monkeypatch):
    """The command defers rfc3987_syntax's grammar (1.5 CPU-s at import) to the first IRI checked (flows/deferred.py)."""
    import inspect
    import sys

    import rfc3987_syntax as real

    from gradlake.flows import deferred

    built = []
    monkeypatch.setattr(deferred, "_helpers", lambda: built.append(1) or sys.modules["rfc3987_syntax.syntax_helpers"])
    monkeypatch.delitem(sys.modules, "rfc3987_syntax")
    deferred.defer_iri_grammar()
    stand_in = sys.modules["rfc3987_syntax"]
    assert stand_in is not real
    inspect.getmodule(test_the_deferred_iri_grammar_answers_as_jsonschemas_and_builds_only_when_asked)  # probes every module
    assert stand_in.__file__ == real.__file__ and not hasattr(stand_in, "__wrapped__") and not built
    for value in ("http://example.org/ä?q=1#f", "not an iri ::", "", "urn:isbn:0451450523"):
        assert stand_in.is_valid_syntax("iri", value) == real.is_valid_syntax("iri", value)
        assert stand_in.is_valid_syntax("iri_reference", value) == real.is_valid_syntax("iri_reference", value)
    assert stand_in.RFC3987_SYNTAX_PARSER_TYPE == real.RFC3987_SYNTAX_PARSER_TYPE and built
