"""The one loss convention: what is differentiated, for every stage.

A sample is a chat (``messages``: role/content dicts).  It is rendered with the
tokenizer's chat template (or one given: `CHAT_TEMPLATES`, or a Jinja file); the loss is
the mean token cross-entropy over the label positions, exactly as ``transformers``
computes it from ``labels`` (shifted by one, ignore index -100, in float32).  Two
paradigms choose the label positions:

- ``sft``: only the tokens of assistant turns (each assistant turn's rendered span), or of
  the last assistant turn alone with ``labels="last_assistant"``;
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
LABELS: tuple[str, ...] = ("assistant", "last_assistant")

# open-instruct's "tulu" format, as the "Select or Project?" thesis rendered its chats: each turn
# opens with <|system|>, <|user|> or <|assistant|> and a newline; user and system turns end in a
# newline, an assistant turn in the eos token, followed by a newline unless it is the last turn.
TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
# Plain text: the contents one after another, no role tags and no special tokens, as a language model reads a
# document (with the `pre` paradigm every token carries loss): how text corpora such as WikiText are trained on.
TEXT = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
CHAT_TEMPLATES = {"tulu": TULU, "text": TEXT}
CHAT_TEMPLATE_HELP = ("How chats are rendered: 'tokenizer' (its own chat template), 'tulu' (open-instruct's format, "
                      "as the 'Select or Project?' thesis rendered them), 'text' (the contents alone, no role tags: "
                      "documents and text corpora) or the path of a Jinja file.")


def chat_template_text(setting: str) -> str | None:
    """The template a setting names: None for the tokenizer's own ('tokenizer'), a built-in by name, or a Jinja file's text."""
    if setting == "tokenizer":
        return None
    if setting in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[setting]
    try:
        with open(setting, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"chat template {setting!r} is neither 'tokenizer', a built-in ({sorted(CHAT_TEMPLATES)}) "
                         f"nor a readable Jinja file ({type(err).__name__})") from None
    _FILES[text] = setting
    _check_syntax(text)
    return text


# Each template text read from a file, by the path it came from: a rendering error names the file.
_FILES: dict[str, str] = {}
_EXAMPLE = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]


def _check_syntax(text: str) -> None:
    """Compile a template's text (rendering a two-turn chat): a syntax error is refused here, before any stage runs."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template([_EXAMPLE], chat_template=text)
    except TemplateSyntaxError as err:
        raise _template_error(err, text) from None
    except Exception:  # noqa: BLE001 - a template may need what only real chats and the tokenizer give; rendering tells
        pass


def _template_error(err: Exception, text: str | None) -> ValueError:
    """One line for a chat template that cannot render: which template, where, and what is accepted."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SecurityError

    name = "the tokenizer's own chat template" if text is None else (
        f"chat template {_FILES[text]!r}" if text in _FILES else "the chat template")
    if isinstance(err, TemplateSyntaxError):
        what = f"has a Jinja syntax error at line {err.lineno}: {err.message}"
    elif isinstance(err, SecurityError):
        what = f"was stopped by Jinja's sandbox ({str(err).rstrip('.')}); a template may only format the messages"
    else:
        what = f"raised {type(err).__name__} while rendering a chat: {str(err).splitlines()[0] if str(err) else '-'}"
    return ValueError(f"{name} {what}; fix the template, or give chat_template 'tokenizer', one of "
                      f"{sorted(CHAT_TEMPLATES)} or another Jinja file")


def _raised_in_template(err: Exception) -> bool:
    """Whether an error came from a template's own code (Jinja's compiled frames), not from the tokenizer's."""
    from jinja2 import TemplateError

    frame = err.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == "<template>":
            return True
        frame = frame.tb_next
    return isinstance(err, TemplateError)


@dataclass(frozen=True)
class Encoded:
    """The exact tokens of one sample and which of them carry loss."""

    input_ids: list[int]
    label_mask: list[bool]

    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.label_mask)]


def _render(tokenizer, messages, add_generation_prompt: bool = False, chat_template: str | None = None) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True,
            **({"chat_template": chat_template} if chat_template is not None else {}),
        )
    except Exception as err:  # noqa: BLE001 - only what the template itself raised is turned into one line
        if not _raised_in_template(err):
            raise
        raise _template_error(err, chat_template) from None
    return list(out["input_ids"])


def encode_sample(tokenizer, messages: list[dict], paradigm: Paradigm, max_length: int,
                  chat_template: str | None = None, labels: str = "assistant") -> Encoded:
    """Tokenize a chat with the tokenizer's chat template (or `chat_template`, a Jinja text) and mark its loss tokens.

    For ``sft`` the span of each assistant turn (``labels="last_assistant"``: of the last
    one only) is found by rendering the chat up to that turn (with the generation prompt)
    and through it; the template must render prefixes consistently, which every standard
    chat template does.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm {paradigm!r} is not known; use one of {PARADIGMS}")
    if labels not in LABELS:
        raise ValueError(f"labels {labels!r} is not known; use one of {LABELS}")
    ids = _render(tokenizer, messages, chat_template=chat_template)
    if paradigm == "pre":
        mask = [True] * len(ids)
    else:
        mask = [False] * len(ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in turns[-1:] if labels == "last_assistant" else turns:
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template))
            through = _render(tokenizer, messages[: i + 1], chat_template=chat_template)
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
