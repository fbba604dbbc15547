"""The README's examples work as written.

Every fenced ```bash, ```python or ```console block runs here, against a small lake laid out as
`make demo` lays out its own (./demo-lake, the trained model at build/trained/tiny-olmo2-probe),
unless the line before it says why it cannot: `<!-- not run: <reason> -->` (a GPU, the hub,
docker, minutes of work). Every `gradlake` command the README or a guide in docs/ names, run or
not, exists, and every option it is given is one of that command's options. The README stays
under 300 lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from typer.main import get_command
from typer.testing import CliRunner

from conftest import REPO, write_probe
from gradlake.flows.cli import app
from gradlake.flows.evaluate import evaluate
from gradlake.flows.extract import extract_gradients
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.projection.spec import ProjectionSpec

README = REPO / "README.md"
RUNNABLE = ("bash", "python", "console")
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->")
# Where the demo puts its trained model and which checkpoint the README reads (flows/demo.py).
TRAINED, CHECKPOINT = Path("build/trained/tiny-olmo2-probe"), "checkpoint-000480"
N = 8  # probe samples in the small lake: one shard of each variant


@dataclass
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the reason given, if any


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, each with the not-run reason on the non-blank line before it."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.fullmatch(before.strip())
        found.append(Block(fence.group(1), "\n".join(lines[i + 1:end]), i + 1, reason and reason.group(1)))
        i = end + 1
    return found


def without_comments(code: str) -> str:
    """Shell text with its comments removed: a # outside quotes that starts a word, to the end of its line."""
    out, quote, i = [], None, 0
    while i < len(code):
        char = code[i]
        if char == "\\" and quote != "'":  # an escaped character, kept as it is
            out.append(code[i:i + 2])
            i += 2
            continue
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or code[i - 1].isspace()):
            i = code.find("\n", i)
            if i < 0:
                break
            char = "\n"
        out.append(char)
        i += 1
    return "".join(out)


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell text, as words: continuations joined, comments dropped, split at line ends
    (outside quotes) and at ; && || | &."""
    lexer = shlex.shlex(without_comments(code.replace("\\\n", " ")), posix=True, punctuation_chars=";&|\n")
    lexer.whitespace, lexer.whitespace_split = " \t\r", True
    commands, current = [], []
    for token in lexer:
        if token.strip(";&|\n") == "":  # a separator
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def named_gradlake_commands(text: str) -> list[list[str]]:
    """Every `gradlake ...` invocation in the README: in fenced shell blocks and in inline code."""
    found = []
    for block in readme_blocks(text):
        if block.language in ("bash", "console"):
            code = "\n".join(line.removeprefix("$ ") for line in block.code.splitlines())
            found += [c[c.index("gradlake"):] for c in shell_commands(code) if "gradlake" in c]
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text):
        if span.startswith("gradlake "):
            found.append(shlex.split(span))
    return found


ROOT = get_command(app)


def resolve(words: list[str]):
    """The click command that `gradlake <words>` runs, and the words after its name."""
    command, rest = ROOT, words[1:]
    while rest and hasattr(command, "commands") and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def options_of(command) -> set[str]:
    return {"--help"} | {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.fixture(scope="module")
def text() -> str:
    return README.read_text()


def test_readme_is_under_300_lines(text):
    assert len(text.splitlines()) < 300


def test_every_example_is_run_or_says_why_not(text):
    blocks = readme_blocks(text)
    assert any(b.language in RUNNABLE and not b.not_run for b in blocks), "no block of the README is run"
    for block in blocks:
        assert block.language in (*RUNNABLE, "text"), f"README line {block.line}: a block's language must be one of {RUNNABLE} or text"
    # a marker belongs to the block right after it
    markers = [i + 1 for i, line in enumerate(text.splitlines()) if "<!-- not run" in line]
    assert len(markers) == sum(1 for b in blocks if b.not_run), f"a not-run marker (lines {markers}) is not right before a block"


def test_every_gradlake_command_named_exists_with_its_options(text):
    """In the README and in the guides it links to (docs/), run here or not."""
    runner, helped = CliRunner(), set()
    named = [(README.name, words) for words in named_gradlake_commands(text)]
    assert len(named) >= 10
    named += [(f"docs/{guide.name}", words) for guide in sorted((REPO / "docs").glob("*.md"))
              for words in named_gradlake_commands(guide.read_text())]
    for source, words in named:
        command, rest = resolve(words)
        shown, named_path = f"{source}: `{' '.join(words)}`", tuple(words[1:len(words) - len(rest)])
        if hasattr(command, "commands") and rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
            raise AssertionError(f"{shown}: {rest[0]!r} is not a command of {' '.join(['gradlake', *named_path])}")
        if named_path not in helped:
            done = runner.invoke(app, [*named_path, "--help"])
            assert done.exit_code == 0, f"`gradlake {' '.join(named_path)} --help` exited {done.exit_code}: {done.output[-500:]}"
            helped.add(named_path)
        known = options_of(command) | ({"--version"} if not named_path else set())
        for word in rest:
            if word.startswith("-") and not re.fullmatch(r"-?\d.*", word):
                assert word.split("=", 1)[0] in known, f"{shown}: {word} is not an option of gradlake {' '.join(named_path)}"


def test_links_lead_to_files(text):
    """The README's links, and the guides' in docs/, lead to files that are there."""
    for page, content in [(README, text), *((guide, guide.read_text()) for guide in sorted((REPO / "docs").glob("*.md")))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", content):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which is not there"


def test_extras_installed_by_the_readme_exist(text):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r"pip install -e '\.\[([\w,-]+)\]'", text)
    assert "notebook" in named, "the README no longer shows how to install the notebook extra"
    for group in named:
        assert set(group.split(",")) <= set(extras), group


@pytest.fixture(scope="module")
def checkout(tiny_models, tmp_path_factory) -> Path:
    """A directory laid out as a checkout after `make demo`, at a small size: the trained model's final checkpoint
    (the session's tiny OLMo-2) at build/trained/tiny-olmo2-probe, and ./demo-lake holding N probe samples, their
    original and paraphrased gradients with a 1024-value Rademacher projection, and their evaluation."""
    root = tmp_path_factory.mktemp("readme").resolve()
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", root / TRAINED / CHECKPOINT)
    lake = f"file://{root / 'demo-lake'}"
    write_probe(lake, N)
    model = ModelSpec(model=str(root / TRAINED), checkpoint=CHECKPOINT)
    for variant in ("original", "paraphrased"):
        extract_gradients(ExtractionSpec(model=model, variant=variant, shard_size=8, batch_size=8, max_length=256, lake=lake,
                                         projections=[ProjectionSpec(kind="rademacher", dim=1024, scope="flat")]))
    evaluate(EvaluationSpec(model=model, queries=["paraphrased"], lake=lake, dense_baseline=False, greedy_steps=0))
    return root


def run_shell(code: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GRADLAKE_LAKE", None)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exited {done.returncode}:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_unmarked_example_runs(text, checkout, monkeypatch):
    blocks = [b for b in readme_blocks(text) if b.language in RUNNABLE and not b.not_run]
    monkeypatch.chdir(checkout)
    for block in blocks:
        where = f"README line {block.line}"
        if block.language == "bash":
            printed = run_shell(block.code, checkout)
            if "gradlake catalog" in block.code:
                assert TRAINED.name in printed and CHECKPOINT in printed, f"{where}: the catalog misses the lake's model"
        elif block.language == "console":
            lines = block.code.splitlines()
            printed = run_shell("\n".join(line[2:] for line in lines if line.startswith("$ ")), checkout)
            for expected in (line for line in lines if line.strip() and not line.startswith("$ ")):
                assert expected.strip() in printed, f"{where}: {expected.strip()!r} is not printed"
        else:
            namespace: dict = {}
            exec(compile(block.code, where, "exec"), namespace)
            tables = {k: v for k, v in namespace.items() if isinstance(v, (pd.DataFrame, xr.DataArray, xr.Dataset))}
            assert tables, f"{where}: the example reads nothing"
            for name, value in tables.items():
                empty = value.empty if isinstance(value, pd.DataFrame) else 0 in value.sizes.values()
                assert not empty, f"{where}: {name} is empty"
