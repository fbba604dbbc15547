"""A command is its spec: `gradlake` options made from a stage's pydantic spec, so that no setting is declared twice.

`spec_command(app, "extract", "gradlake.tasks.gradients.plan:ExtractionSpec")` registers the decorated
`run(spec, **extras)` as a command whose options are the spec's fields, made by these rules:

- One option per field, ``--field-name``, its help the field's description, its default the field's default.
- A nested model is flattened into its own fields: ``model: ModelSpec`` gives ``--model``, ``--checkpoint``,
  ``--dtype``, ... .  The fields of an optional one (``paraphrase: ParaphraseSpec | None``) carry its name
  (``--paraphrase-model``), and ``--paraphrase/--no-paraphrase`` turns it on (with its defaults) or off; giving
  one of its fields turns it on too.
- Where two fields would take the same name, each nested one is prefixed with the field that holds it, until
  the names differ (``base.model`` and ``candidate.model``: ``--base-model``, ``--candidate-model``); a top-level
  field keeps its own name (``AttributionSpec.checkpoint`` is ``--checkpoint``, ``train.model.checkpoint`` is
  ``--model-checkpoint``).  A command may give a field further names (``names``), e.g. the shorter ones it had.
- Literal fields take one of their choices; bools are ``--x/--no-x``; a list is the option repeated
  (``--layers A --layers B``); a field that may be empty takes ``none``.  Every value is validated by the spec.
- Other types (dicts, unions, lists of models) take JSON text, or a short form the command gives a parser for
  (``--project rademacher:flat:8192``).  A list of models may instead be flattened with ``each``: its key field
  repeats, one item per value, and its other fields apply to every item (``--model A --model B --pattern P``).

Every such command also takes ``--spec JSON|@file.json``, the document the deployment's `spec` parameter takes:
it gives the base values, the options given on the command line override them (a list replaces the file's
list), and the merged document is validated once by the spec, so a bad value is one `error:` line naming it
before any work.  A command's options are made when it is run or asked for help, not when `gradlake` starts,
so listing the commands imports no stage (and neither torch nor Prefect).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel, ValidationError
from typer.core import TyperCommand

from gradlake.flows.flags import NONE, Flag, Parser, flag_help, flag_metavar, flag_value, shown_default, spec_flags


SPEC_HELP = ("Settings as JSON text or @file.json: the same document as the deployment's `spec` parameter; "
             "the options given here override its values.")


def refuse(text: object) -> typing.NoReturn:
    """End the command with one `error:` line (exit code 2): how every command reports bad input."""
    typer.secho(f"error: {text}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def validation_line(err: ValidationError, flags: list[Flag] | None = None) -> str:
    """A pydantic error as one line per bad field: where (and its option), what is wrong, what was given (no docs link)."""
    options = {flag.key: flag.option for flag in flags or []}
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or err.title
        names = [str(p) for p in problem["loc"] if not isinstance(p, int)]
        option = next((options[".".join(names[:n])] for n in range(len(names), 0, -1) if ".".join(names[:n]) in options), None)
        given = problem.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        parts.append(f"{where}{f' ({option})' if option else ''}: {problem['msg']}{shown}")
    return "; ".join(parts)


def read_spec(text: str | None) -> dict:
    """The --spec document: JSON text or @file.json, a JSON object; {} when not given."""
    if text is None:
        return {}
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ValueError(f"--spec {text!r}: no file {path}; give JSON text or @path/to/spec.json")
        text = path.read_text()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--spec is not JSON ({err}); give JSON text or @path/to/spec.json") from None
    if not isinstance(document, dict):
        raise ValueError(f"--spec must be a JSON object of settings, not {type(document).__name__}")
    return document


def merged(document: dict, flags: list[Flag], given: dict[str, Any],
           fallbacks: dict[str, Callable[[], Any]] | None = None) -> dict:
    """The --spec document with the options given (by flag name) put over it: what the spec validates."""
    out = copy.deepcopy(document)
    chosen = [flag for flag in flags if flag.name in given]
    for flag in chosen:
        if flag.kind == "switch" and given[flag.name] is False:
            inside = [f.option for f in chosen if f.path[:len(flag.path)] == flag.path and f is not flag]
            if inside:
                raise ValueError(f"--no-{flag.name} turns {flag.key} off, but {', '.join(inside)} set it")
            _put(out, flag.path, None)
        elif flag.kind == "switch" and not isinstance(_get(out, flag.path), dict):
            _put(out, flag.path, {})
    lists: dict[tuple[str, ...], tuple[list, dict]] = {}
    for flag in chosen:
        value = given[flag.name]
        if flag.kind == "switch":
            continue
        if flag.kind == "many":
            empty = flag.nullable and len(value) == 1 and value[0].strip().lower() in NONE
            value = None if empty else [flag_value(flag, v) for v in value]
        elif flag.kind == "value":
            value = flag_value(flag, value)
        if flag.each:
            keys, shared = lists.setdefault(flag.each, ([], {}))
            if flag.each_key:
                keys.extend((flag.path[-1], v) for v in value)
            else:
                shared[flag.path[-1]] = value
            continue
        _put(out, flag.path, value)
    for path, (keys, shared) in lists.items():
        if keys:
            _put(out, path, [{key: value, **shared} for key, value in keys])
        else:  # the list the --spec file gives, each item changed
            items = _get(out, path)
            _put(out, path, [{**item, **shared} if isinstance(item, dict) else item for item in items or []])
    for key, fallback in (fallbacks or {}).items():
        path = tuple(key.split("."))
        if _get(out, path) is None:
            _put(out, path, fallback())
    return out


def _get(document: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(document, dict):
            return None
        document = document.get(part)
    return document


def _put(document: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(document.get(part), dict):
            document[part] = {}
        document = document[part]
    document[path[-1]] = value


@dataclass
class Declaration:
    """What `spec_command` was given: the spec (imported on first use), the command's own options and how to run it."""

    spec: str  # "module:Class"
    run: Callable[..., Any]
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    parsers: dict[str, Parser] = field(default_factory=dict)
    each: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, Callable[[], Any]] = field(default_factory=dict)
    unless: str | None = None
    presets: dict[str, Callable[[], BaseModel]] = field(default_factory=dict)

    def spec_class(self) -> type[BaseModel]:
        module, _, name = self.spec.partition(":")
        return getattr(importlib.import_module(module), name)

    def extras(self) -> list[inspect.Parameter]:
        """The command's own options: `run`'s parameters after the spec (typer options), their annotations evaluated."""
        hints = typing.get_type_hints(self.run)
        return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
                for p in list(inspect.signature(self.run).parameters.values())[1:]]

    def flags(self) -> list[Flag]:
        own = [(p.default.param_decls or (f"--{p.name.replace('_', '-')}",))[0].lstrip("-") for p in self.extras()]
        return spec_flags(self.spec_class(), names=self.names, parsers=self.parsers, each=self.each, reserved=("spec", *own))

    def function(self) -> Callable[..., Any]:
        """The command's callback, with a signature typer reads as its options."""
        spec_class, flags, extras = self.spec_class(), self.flags(), self.extras()
        run, unless = self.run, self.unless
        fallbacks, presets = self.fallbacks, self.presets

        def command(**values):
            ctx, text = values.pop("ctx"), values.pop("spec")
            extra = {p.name: values.pop(p.name) for p in extras}
            if unless and extra.get(unless):
                return run(None, **extra)
            given = {flag.name: values[flag.dest] for flag in flags
                     if getattr(ctx.get_parameter_source(flag.dest), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
            try:
                document = read_spec(text)
                for name, preset in presets.items():
                    if extra.get(name):  # a preset's values under the file's and the options'
                        document = {**preset().model_dump(mode="json"), **document}
                spec = spec_class.model_validate(merged(document, flags, given, fallbacks))
            except ValidationError as err:
                refuse(validation_line(err, flags))
            except ValueError as err:
                refuse(err)
            return run(spec, **extra)

        keyword = inspect.Parameter.KEYWORD_ONLY
        params = [inspect.Parameter("ctx", keyword, annotation=typer.Context),
                  inspect.Parameter("spec", keyword, annotation=Optional[str],
                                    default=typer.Option(None, "--spec", metavar="JSON|@FILE", help=SPEC_HELP))]
        for flag in flags:
            annotation = {"many": Optional[list[str]], "bool": Optional[bool], "switch": Optional[bool]}.get(
                flag.kind, Optional[str])
            decls = [f"--{flag.name}/--no-{flag.name}"] if flag.kind in ("bool", "switch") else [flag.option]
            option = typer.Option(shown_default(flag, fallbacks), *decls, *flag.names, help=flag_help(flag, flags, fallbacks),
                                  metavar=None if flag.kind in ("bool", "switch") else flag_metavar(flag), show_default=True)
            params.append(inspect.Parameter(flag.dest, keyword, annotation=annotation, default=option))
        command.__signature__ = inspect.Signature([*params, *extras])
        command.__doc__ = run.__doc__
        return command

    def bare_function(self) -> Callable[..., Any]:
        """The callback where `unless` is given: the command's own options only, the spec never imported
        (`gradlake watch --off` then imports no stage)."""
        run = self.run

        def command(**extra):
            return run(None, **extra)

        command.__signature__ = inspect.Signature(self.extras())
        command.__doc__ = run.__doc__
        return command


class SpecCommand(TyperCommand):
    """A command whose options and callback are made from its spec on first use (a run or its help), not at start-up.

    Its help is click's plain layout: dozens of options read better in 100 columns than in rich's table,
    and each description is shown as written (rich would take square brackets for markup)."""

    declaration: Declaration

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "rich_markup_mode": None})

    @cached_property
    def made(self) -> TyperCommand:
        one = typer.Typer(add_completion=False)
        one.command(self.name)(self.declaration.function())
        return typer.main.get_command(one)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        unless = self.declaration.unless
        if unless and f"--{unless}" in args and "made" not in self.__dict__:  # the spec's options are not needed
            one = typer.Typer(add_completion=False)
            one.command(self.name)(self.declaration.bare_function())
            self.__dict__["made"] = typer.main.get_command(one)
        return super().parse_args(ctx, args)

    @property
    def params(self) -> list:
        return self.made.params

    @params.setter
    def params(self, value: list) -> None:
        pass  # the stub's (none): the spec's own are made on first use

    @property
    def callback(self) -> Callable[..., Any]:
        return self.made.callback

    @callback.setter
    def callback(self, value: Callable[..., Any]) -> None:
        pass


def spec_command(app: typer.Typer, name: str, spec: str, *, names: dict[str, tuple[str, ...]] | None = None,
                 parsers: dict[str, Parser] | None = None, each: dict[str, str] | None = None,
                 fallbacks: dict[str, Callable[[], Any]] | None = None, unless: str | None = None,
                 presets: dict[str, Callable[[], BaseModel]] | None = None):
    """Register the decorated `run(spec, **extras)` as command `name` of `app`, its options made from `spec` ("module:Class").

    `run` receives the validated spec, and its own further parameters (typer options) as they are.
    `names`: further names of a field's option, by field path ("model.checkpoint").
    `parsers`: (metavar, text -> value) of a field's short form, by field path.
    `each`: a list of models flattened, by its path: the name of its key field.
    `fallbacks`: a value for a field that neither --spec nor an option gives, by path (e.g. the default lake).
    `unless`: a boolean option of `run` that, when set, skips the spec (`run` gets None): its options are then not
    made, so the spec's module is not imported, and giving one of them is an error.
    `presets`: boolean options of `run` that, when set, give the spec's base values (under --spec and the options).
    """
    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        declaration = Declaration(spec, run, {k: tuple(v) for k, v in (names or {}).items()}, parsers or {}, each or {},
                                  fallbacks or {}, unless, presets or {})
        command_class = type(f"{run.__name__}_command", (SpecCommand,), {"declaration": declaration})

        def stub() -> None:
            """Stands in until the command's options are made."""

        app.command(name, cls=command_class, help=inspect.getdoc(run))(stub)
        return run

    return register
