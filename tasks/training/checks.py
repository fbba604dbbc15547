"""What a training run refuses to go on with: NaN or Inf in its weights or loss, a checkpoint whose files changed.

The same spec gives the same values, so a run that met a NaN meets it again: it stops at the first one,
names the step (and the tensor), and writes no checkpoint past it.  A checkpoint is resumed only when its
files match the digest manifest written with it (``lake/manifest.py``), so damaged optimizer moments or
RNG state never continue into weights that differ from the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator

import fsspec
import torch

from gradlake.lake.manifest import DamagedFile, check_directory, read_checked
from gradlake.lake.store import LakeError, storage_options_for, storage_problem
from gradlake.tasks.training.spec import LINEAGE_FILE, TrainError, TrainSpec, checkpoint_name


class NonFiniteTraining(TrainError):
    """NaN or Inf in the weights or the loss: training stopped there (the same spec meets it again, so no retry)."""


class DamagedCheckpoint(TrainError):
    """A checkpoint whose files differ from its manifest, or whose lineage record cannot be read."""


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or Inf, or None when every weight is finite."""
    flags = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
    if bool(flags.all()):  # one device synchronisation for the whole model
        return None
    return next(name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all()))


def _last_good(done: list[int], before: int) -> str:
    earlier = [s for s in done if s < before]
    return (f"no checkpoint was written past {checkpoint_name(max(earlier))}, the last good one" if earlier
            else "no checkpoint of this run was written")


def check_start_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse to train from weights holding NaN or Inf (`where`: the base model or the checkpoint resumed)."""
    name = first_non_finite(model)
    if name is not None:
        raise NonFiniteTraining(f"the weights of {where} hold NaN or Inf ({name} first): training stopped before "
                                "step 1 and wrote nothing; train from a checkpoint with finite weights")


def check_step(loss: float, step: int, total: int, rate: float, written: list[int]) -> None:
    """Stop at optimizer step `step` (1-based) when its loss is NaN or Inf; `written`: the run's checkpoint steps so far."""
    if not math.isfinite(loss):
        raise NonFiniteTraining(f"training stopped at step {step} of {total}: the loss is {loss} (learning rate "
                                f"{rate:.3g} at that step); {_last_good(written, step)}; "
                                "lower learning_rate (or raise warmup_steps) and train into a new output prefix")


def check_before_save(model: torch.nn.Module, step: int, total: int, written: list[int]) -> None:
    """Refuse to write checkpoint `step` when a weight went NaN or Inf (a gradient that overflowed, say)."""
    name = first_non_finite(model)
    if name is not None:
        raise NonFiniteTraining(f"training stopped at step {step} of {total}: the weights hold NaN or Inf ({name} "
                                f"first), so {checkpoint_name(step)} was not written; {_last_good(written, step)}; "
                                "lower learning_rate or set max_grad_norm, and train into a new output prefix")


def _what_to_do(path: str) -> str:
    return (f"remove {path} and train again to resume from the checkpoint before it (or from the start), "
            "or train into a new output prefix")


def check_resumable(directory: str, shown: str) -> bool:
    """Compare a local checkpoint `directory` (shown to the user as `shown`) with its manifest; False if it has none.

    Raises DamagedCheckpoint naming the first file that differs and what to do."""
    fs = fsspec.filesystem("file")
    problems = check_directory(fs, directory, required=False)
    if problems:
        first = problems[0].replace(directory, shown)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedCheckpoint(f"checkpoint {shown} cannot be resumed: {first}{more}; {_what_to_do(shown)}")
    return fs.exists(f"{directory}/manifest.json")


def read_lineage(fs: fsspec.AbstractFileSystem, directory: str, shown: str) -> dict:
    """A checkpoint's ``gradlake_train.json``, checked against its manifest where it has one; one clear error if damaged."""
    try:
        record = json.loads(read_checked(fs, directory, LINEAGE_FILE))
        if not isinstance(record, dict):
            raise ValueError(f"it holds a {type(record).__name__}, not a record")
    except FileNotFoundError:
        return {}
    except DamagedFile as err:  # its own advice is the lake's; a checkpoint's is to resume from the one before
        problem = str(err).split("; run `gradlake verify`")[0].split("; write that directory again")[0]
        raise DamagedCheckpoint(f"{problem.replace(directory, shown)}; {_what_to_do(shown)}") from None
    except (LakeError, ValueError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{shown}/{LINEAGE_FILE} is damaged ({type(err).__name__}: {str(err)[:80]}); "
                                f"{_what_to_do(shown)}") from None
    return record


def storage_failure(err: BaseException, url: str, storage_options: dict, what: str) -> TrainError | None:
    """One line for a storage failure mid-run (an S3 endpoint gone, credentials refused), naming the endpoint; else None.

    `what`: what was not done, said first ("checkpoint-000004 was not written whole")."""
    problem = storage_problem(err, url, storage_options_for(url, storage_options), writing=True)
    if problem is None:
        return None
    return TrainError(f"{what} ({problem}); a checkpoint without all its files is never resumed from: train again "
                      "once the storage answers, and the run resumes from its last complete checkpoint")


@contextlib.contextmanager
def storage_named(spec: TrainSpec, what: str, lake_first: bool = False) -> Iterator[None]:
    """Within it, the lake's or the checkpoint prefix's storage failing (an S3 endpoint gone) is one TrainError naming
    the endpoint, said after `what`; any other error passes unchanged.  The line names the prefix when it is on S3
    (the lake with `lake_first`, when that is on S3)."""
    try:
        yield
    except TrainError:
        raise
    except Exception as err:
        remote = [u for u in ((spec.lake, spec.output) if lake_first else (spec.output, spec.lake))
                  if u.startswith(("s3://", "s3a://"))]
        url = remote[0] if remote else spec.output
        told = storage_failure(err, url, spec.storage_options if url == spec.output else {}, what)
        if told is None:
            raise
        raise told from None
