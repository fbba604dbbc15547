"""The model-generated variant: the model under study answers each prompt itself.

Each chat is cut after its last user turn, rendered with the model's chat template and a
generation prompt, and answered greedily.  Prompts are batched with left padding and
an attention mask (sorted by length, so batches pad little), which gives the same
tokens as answering one prompt at a time.
"""

from __future__ import annotations

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from gradlake.tasks.common.model import ModelSpec, load_model, load_tokenizer


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The chat up to and including its last user turn."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


@torch.no_grad()
def generate_answers(model, tokenizer, frame: pd.DataFrame, max_new_tokens: int, batch_size: int,
                     log=print) -> pd.DataFrame:
    """A copy of `frame` whose chats end in the model's own greedy answer to their last user turn."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template, so prompts cannot be rendered for generation")
    prompts = [prompt_messages(m) for m in frame["messages"]]
    encoded = [tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
               for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for r, i in enumerate(rows):
            answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
        log(f"generated {min(start + batch_size, len(order))}/{len(order)} answers")
    result = frame.copy()
    result["messages"] = [p + [{"role": "assistant", "content": answers[i]}] for i, p in enumerate(prompts)]
    return result


@task(name="generate-answers", cache_policy=NONE, retries=1, retry_delay_seconds=[30])
def generate_task(frame: pd.DataFrame, model: ModelSpec, max_new_tokens: int, batch_size: int) -> pd.DataFrame:
    """Answer every prompt with `model` at its checkpoint (on the GPU when there is one)."""
    spec = model.resolved()
    return generate_answers(load_model(spec), load_tokenizer(spec), frame, max_new_tokens, batch_size,
                            log=get_run_logger().info)
