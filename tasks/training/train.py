"""The training loop, resumable from its last complete checkpoint, and its Prefect tasks."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from gradlake.tasks.common.loss import Encoded, chat_template_text, encode_sample, pad_batch, sample_losses
from gradlake.tasks.common.model import capped_length, check_model
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.training.checks import (check_before_save, check_resumable, check_start_weights, check_step,
                                            storage_named)
from gradlake.tasks.training.checkpoints import (load_for_training, local_copy, measure_checkpoint, restore_optimizer,
                                                 restore_rng, save_checkpoint)
from gradlake.tasks.training.claim import prefix_claimed
from gradlake.tasks.training.plan import Plan, batch_of_step, learning_rate, plan_run, refuse_foreign_checkpoints
from gradlake.tasks.training.spec import STATE_DIR, TrainError, TrainSpec, checkpoint_name


@dataclass
class TrainResult:
    checkpoints: list[str]      # names of every checkpoint of the run, in step order
    final: str
    losses: list[float]         # the loss of each step run in this call
    resumed_from: int           # step the call started at


def _encode(plan: Plan, tokenizer) -> list[Encoded]:
    spec = plan.spec
    max_length = capped_length(spec.max_length, check_model(spec.model), spec.model.model)[0]
    template = chat_template_text(spec.chat_template)
    if template is None and not tokenizer.chat_template:
        raise TrainError(f"the tokenizer of {spec.model.model!r} has no chat template; give chat_template 'text' "
                         "(documents), 'tulu' or a Jinja file")
    encoded = [encode_sample(tokenizer, chat, spec.paradigm, max_length, template) for chat in plan.data.chats]
    empty = [plan.data.keys[i] for i, e in enumerate(encoded) if sum(e.label_mask) < 2]
    if empty:
        raise TrainError(f"samples {empty[:5]} have no loss tokens under paradigm {spec.paradigm!r} "
                         f"within max_length {spec.max_length}; raise max_length or drop them")
    return encoded


def train(plan: Plan, log: Callable[[str], None] = print, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or finish) the planned training, holding the prefix's claim; every planned checkpoint exists afterwards."""
    spec = plan.spec
    start = max((s for s in plan.done), default=None)
    names = [checkpoint_name(s) for s in plan.saves]
    if start == plan.total_steps and all(s in plan.done for s in plan.saves):
        log(f"all {len(plan.saves)} checkpoints of this run are already at {spec.output}; nothing to train")
        return TrainResult(names, checkpoint_name(plan.total_steps), [], plan.total_steps)
    with prefix_claimed(spec, plan.fingerprint):  # another run training into the prefix: refused before any writing
        refuse_foreign_checkpoints(spec, plan.fingerprint)  # again, now that it is ours: one may have finished meanwhile
        return _run(plan, start, names, log, on_step)


def _run(plan: Plan, start: int | None, names: list[str], log: Callable[[str], None],
         on_step: Callable[[int, float], None] | None) -> TrainResult:
    from safetensors.torch import load_file

    spec = plan.spec
    with tempfile.TemporaryDirectory(prefix="gradlake-resume-") as tmp:
        resume_dir = local_copy(spec, checkpoint_name(start), tmp) if start is not None else None
        shown = f"{spec.output.rstrip('/')}/{checkpoint_name(start)}" if start is not None else None
        if resume_dir is not None and not check_resumable(str(resume_dir), shown):
            log(f"{checkpoint_name(start)} has no manifest (written before checkpoints had one): resumed unchecked")
        torch.manual_seed(spec.seed)
        model, tokenizer = load_for_training(spec, resume_dir)
        check_start_weights(model, shown or f"{spec.model.model!r} ({spec.model.checkpoint or 'its main revision'})")
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
        if resume_dir is not None:
            info = json.loads((resume_dir / STATE_DIR / "optimizer.json").read_text())
            restore_optimizer(optimizer, load_file(str(resume_dir / STATE_DIR / "optimizer.safetensors")), info)
            restore_rng(load_file(str(resume_dir / STATE_DIR / "rng.safetensors")))
            log(f"resuming from {checkpoint_name(start)} (step {start} of {plan.total_steps})")
    step = start or 0
    written = list(plan.done)
    encoded = _encode(plan, tokenizer)
    device = next(model.parameters()).device
    micro = spec.micro_batch_size or spec.batch_size
    losses: list[float] = []
    if step == 0 and 0 in plan.saves and 0 not in plan.done:
        save_checkpoint(model, tokenizer, optimizer, plan, 0, losses)
    model.train()
    while step < plan.total_steps:
        batch = batch_of_step(step, spec.seed, len(encoded), spec.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step, plan.total_steps)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for lo in range(0, len(batch), micro):
            ids, labels = pad_batch([encoded[i] for i in batch[lo:lo + micro]], tokenizer.pad_token_id)
            per_sample = sample_losses(model(input_ids=ids.to(device)).logits, labels.to(device))
            loss = per_sample.sum() / len(batch)
            loss.backward()
            total += float(loss.detach())
        check_step(total, step + 1, plan.total_steps, optimizer.param_groups[0]["lr"], written)  # before the update
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        step += 1
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
        if step % max(1, plan.total_steps // 20) == 0 or step == plan.total_steps:
            log(f"step {step}/{plan.total_steps} loss {total:.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
        if step in plan.saves:
            check_before_save(model, step, plan.total_steps, written)
            model.eval()
            where = save_checkpoint(model, tokenizer, optimizer, plan, step, losses)
            written.append(step)
            log(f"checkpoint {checkpoint_name(step)} written to {where}")
            model.train()
    model.eval()
    return TrainResult(names, checkpoint_name(plan.total_steps), losses, start or 0)


@task(name="plan-training", cache_policy=NONE)
def plan_task(spec: TrainSpec) -> Plan:
    """Model config, lake data, keep/drop ids and the checkpoint prefix, checked before anything is trained or written."""
    plan = plan_run(spec)
    get_run_logger().info(
        "training %s on %d samples of %s %s for %d steps (%d per epoch); checkpoints at steps %s; %s",
        spec.model.model, len(plan.data.keys), spec.dataset, spec.variants, plan.total_steps, plan.steps_per_epoch,
        plan.saves, f"{len(plan.done)} already written" if plan.done else "none written yet")
    return plan


@task(name="train", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input)
def train_task(spec: TrainSpec) -> list[str]:
    """Train, resuming from the last complete checkpoint when a previous attempt was killed."""
    log = get_run_logger()
    with storage_named(spec, "training stopped"):
        plan = plan_run(spec)  # again: a retry sees the checkpoints the failed attempt left
    artifact = create_progress_artifact(100.0 * (max(plan.done, default=0) / plan.total_steps),
                                        description=f"training steps done, of {plan.total_steps}")
    every = max(1, plan.total_steps // 100)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == plan.total_steps:
            update_progress_artifact(artifact, 100.0 * step / plan.total_steps)

    with storage_named(spec, "training stopped"):
        result = train(plan, log=log.info, on_step=on_step)
    return result.checkpoints


@task(name="answer-quality", cache_policy=NONE, retries=1, retry_delay_seconds=[30],
      retry_condition_fn=retry_unless_bad_input)
def quality_task(spec: TrainSpec, name: str) -> dict:
    """ROUGE-L, BLEU (and the judge's grade) of one checkpoint's greedy answers, stored in the lake."""
    with storage_named(spec, f"the answers of {name} were not scored", lake_first=True):
        return measure_checkpoint(spec, name, log=get_run_logger().info)
