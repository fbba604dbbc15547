"""Bad input through the real `gradlake` command: one `error:` line naming the bad value, exit code 2, no traceback.

Each case runs the installed entry point in a subprocess (Prefect's console handlers, the command's own
error handling and `hide_told_tracebacks` as a user meets them), against the session's Prefect server.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_probe

GRADLAKE = str(Path(sys.executable).with_name("gradlake"))
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def gradlake(*args: str, file_size: int | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the command; `file_size` caps the size of any file it writes (RLIMIT_FSIZE: a write past it is EFBIG)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))) if file_size else None
    done = subprocess.run([GRADLAKE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"}, preexec_fn=limit)
    return done.returncode, done.stdout + done.stderr


def one_error(code: int, out: str, *named: str) -> str:
    """The command's one `error:` line, checked: exit code 2, no traceback, and naming each of `named`."""
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out[-4000:]
    for text in named:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def probe_lake(tmp_path_factory) -> Path:
    lake = tmp_path_factory.mktemp("bad-input") / "lake"
    write_probe(str(lake), 4)
    return lake


TEMPLATES = {
    "syntax": ("{% for m in messages %}{{ m.content }\n", "Jinja syntax error at line 1"),
    "raises": ("{{ raise_exception('no system turns here') }}", "raised TemplateError while rendering a chat: no system turns"),
    "divides": ("{% for m in messages %}{{ 1 / 0 }}{% endfor %}", "raised ZeroDivisionError"),
    "escapes": ("{{ cycler.__init__.__globals__.os.system('id') }}", "stopped by Jinja's sandbox"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_a_chat_template_that_cannot_render(case, tiny_models, probe_lake, tmp_path):
    text, said = TEMPLATES[case]
    template = tmp_path / f"{case}.jinja"
    template.write_text(text)
    code, out = gradlake("extract", "--model", tiny_models["olmo2"], "--checkpoint", "checkpoint-1", "--lake", probe_lake,
                         "--chat-template", template)
    one_error(code, out, f"chat template {str(template)!r}", said, "'tulu'")
    assert not (probe_lake / "gradients").exists()


def test_a_lone_surrogate_in_a_dataset(tmp_path):
    source = tmp_path / "chats.jsonl"
    rows = [{"id": "fine", "messages": CHAT},
            {"id": "broken", "messages": [CHAT[0], {"role": "assistant", "content": "half a pair: \ud83d here"}]}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ensure_ascii: the half pair as \ud83d
    lake = tmp_path / "lake"
    code, out = gradlake("dataset", "create", "--name", "chats", "--source", source, "--lake", lake)
    one_error(code, out, "sample 'broken' (row 1)", "U+D83D", "messages[1].content at character 13")
    assert not any(lake.rglob("*")), "nothing written"


@pytest.mark.parametrize("option, said", [
    (["--pattern", "checkpoint-["], "--pattern 'checkpoint-[' of"),
    (["--layers", "mlp.*.weight"], "layer pattern 'mlp.*.weight' matched no parameter"),
])
def test_watch_refuses_what_no_tick_could_use(option, said, tiny_models, probe_lake):
    code, out = gradlake("watch", "-m", tiny_models["olmo2"], *option, "--lake", probe_lake)
    one_error(code, out, said)
    assert "watching" not in out


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a file system that fills up (mounting needs root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; the file-size limit case covers EFBIG")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_ends_at_once_in_one_line(small_disk):
    code, out = gradlake("dataset", "create", "--name", "probe", "--lake", small_disk / "lake")
    one_error(code, out, f"writing {small_disk}/lake/datasets/probe/", "no space left on the device", "free of 64.0 KiB")
    assert "Retry" not in out, "a full disk is not retried"


def test_a_file_size_limit_ends_at_once_in_one_line(tmp_path):
    code, out = gradlake("dataset", "create", "--name", "probe", "--lake", tmp_path / "lake", file_size=8192)
    one_error(code, out, f"writing {tmp_path}/lake/datasets/probe/", "file too large for this process's limit of 8.0 KiB")
    assert "Retry" not in out


def test_a_full_disk_during_extraction(tiny_models, small_disk):
    lake = small_disk / "lake"
    write_probe(str(lake), 4)
    code, out = gradlake("extract", "--model", tiny_models["olmo2"], "--checkpoint", "checkpoint-1", "--lake", lake)
    one_error(code, out, f"writing {lake}/", "no space left on the device")  # the lake's root zarr.json or a group's
    assert "Retry" not in out


@pytest.fixture(scope="module")
def damaged_lake(tiny_models, tmp_path_factory) -> tuple[Path, str]:
    """Original and paraphrased gradients of four probes, one chunk object of the originals overwritten with garbage."""
    from test_batching import run

    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.gradients.plan import ExtractionSpec

    lake = tmp_path_factory.mktemp("damaged") / "lake"
    write_probe(str(lake), 4)
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    groups = {variant: run(ExtractionSpec(model=model, lake=str(lake), variant=variant, shard_size=4, batch_size=4,
                                          max_length=128)).path for variant in ("original", "paraphrased")}
    chunk = lake / groups["original"] / "model.layers.0.mlp.up_proj.weight" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10:17] = b"garbage"
    chunk.write_bytes(bytes(data))
    return lake, groups["original"]


def test_evaluate_on_a_damaged_chunk(tiny_models, damaged_lake):
    lake, _ = damaged_lake
    code, out = gradlake("evaluate", "--model", tiny_models["olmo2"], "--checkpoint", "checkpoint-1", "--lake", lake,
                         "-q", "paraphrased", "--no-dense-baseline")
    one_error(code, out, "chunk object model.layers.0.mlp.up_proj.weight/c/0/0 is damaged", "gradlake verify --repair")
    assert len(out.splitlines()) < 20, out


def test_project_on_a_damaged_chunk(damaged_lake):
    lake, original = damaged_lake
    code, out = gradlake("project", "--gradients", original, "--kind", "gaussian", "--dim", "8", "--scope", "flat",
                         "--lake", lake)
    one_error(code, out, "chunk object model.layers.0.mlp.up_proj.weight/c/0/0 is damaged", "gradlake verify --repair")
    assert len(out.splitlines()) < 20, out


def test_a_lookup_among_3000_groups_names_a_few(damaged_lake, tmp_path):
    """Thousands of groups that match, or none that does: the message names a few and counts the rest."""
    from gradlake.lake import open_lake
    from gradlake.lake.store import LakeError

    source, original = damaged_lake
    model, _, *rest = original.split("/")[1:]
    record = json.loads((source / original / "zarr.json").read_text())
    for i in range(3000):
        record["attributes"]["gradlake"]["lineage"]["checkpoint"] = f"step{i:05d}"
        group = tmp_path / "lake" / "gradients" / model / f"step{i:05d}" / "/".join(rest)
        group.mkdir(parents=True)
        (group / "zarr.json").write_text(json.dumps(record))
    lake = open_lake(str(tmp_path / "lake"))
    with pytest.raises(LakeError, match=r"3000 gradient groups match .* tell them apart with checkpoint='step00000' or "
                                        r"'step00001' or .* \(2994 more\) or 'step02999'$") as ambiguous:
        lake.gradients(dataset="probe", variant="original")
    with pytest.raises(LakeError, match=r"the lake holds .* \(2994 more\), .*'step02999'") as missing:
        lake.gradients(dataset="probe", variant="original", checkpoint="step9")
    assert len(str(ambiguous.value)) < 400 and len(str(missing.value)) < 1500
