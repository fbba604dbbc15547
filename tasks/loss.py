"""The one loss convention: what is differentiated, for every stage.

A sample is a chat (``messages``: role/content dicts).  It is rendered with the
tokenizer's chat template; the loss is the mean token cross-entropy over the label
positions, exactly as ``transformers`` computes it from ``labels`` (shifted by one,
ignore index -100, in float32).  Two paradigms choose the label positions:

- ``sft``: only the tokens of assistant turns (each assistant turn's rendered span);
- ``pre``: every token of the rendered conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Paradigm = Literal["sft", "pre"]
PARADIGMS: tuple[str, ...] = ("sft", "pre")


@dataclass(frozen=True)
class Encoded:
    """The exact tokens of one sample and which of them carry loss."""

    input_ids: list[int]
    label_mask: list[bool]

    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.label_mask)]


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def encode_sample(tokenizer, messages: list[dict], paradigm: Paradigm, max_length: int) -> Encoded:
    """Tokenize a chat with the tokenizer's chat template and mark its loss tokens.

    For ``sft`` the span of each assistant turn is found by rendering the chat up to
    that turn (with the generation prompt) and through it; the template must render
    prefixes consistently, which every standard chat template does.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm {paradigm!r} is not known; use one of {PARADIGMS}")
    ids = _render(tokenizer, messages)
    if paradigm == "pre":
        mask = [True] * len(ids)
    else:
        mask = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
            through = _render(tokenizer, messages[: i + 1])
            if through != ids[: len(through)]:
                raise ValueError(
                    "the chat template does not render conversation prefixes consistently, "
                    "so assistant tokens cannot be located; use paradigm 'pre' or a standard template"
                )
            for t in range(start, len(through)):
                mask[t] = True
    ids, mask = ids[:max_length], mask[:max_length]
    return Encoded(input_ids=ids, label_mask=mask)


def pad_batch(encoded: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: (input_ids, labels), labels -100 on padding and non-loss tokens."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.input_ids)] = torch.tensor(e.labels())
    return ids, labels


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean token loss, shifted as in ``transformers`` (float32): shape (batch,).

    Position t predicts label t + 1.  The labels are shifted rather than the logits
    sliced, which spares a copy of the (batch, tokens, vocabulary) logits and its
    zero-filled gradient in the backward pass.
    """
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token.sum(dim=1) / counts.clamp_min(1)
