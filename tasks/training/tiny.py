"""Tiny models of the real architectures, built offline for the tests and the demo.

Nothing is downloaded: a byte-level BPE tokenizer is trained on the chats given, with
an OLMo/Tulu-style chat template, and random-weight ``OlmoForCausalLM`` (AMD-OLMo-1B's
architecture), ``Olmo2ForCausalLM`` (OLMo-2-7B's) or ``GPT2LMHeadModel`` models are saved as checkpoint
directories that ``from_pretrained`` loads like any other.  Later checkpoints are the
earlier ones trained a few steps further, so checkpoints really differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from prefect import task
from prefect.cache_policies import NONE

from gradlake.tasks.common.loss import encode_sample, pad_batch, sample_losses
from gradlake.tasks.data.probes import load_probe_set, probe_variant


if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

Architecture = Literal["olmo", "olmo2", "gpt2"]
ARCHITECTURES: dict[str, str] = {"olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
# The BPE trainer numbers the special tokens first, in the order given.
EOS_ID, PAD_ID = 0, 1
# The Tulu/OLMo layout: a role tag line, the content, and an end-of-text after each answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TRAIN_BATCH, TRAIN_MAX_TOKENS, TRAIN_LR = 4, 128, 3e-3


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with OLMo's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    # Every newline is a piece of its own: the generation prompt ends in one, so an answer
    # that begins with whitespace cannot merge with it, and a chat's prefix tokenizes as
    # a prefix of the chat.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    # The full byte alphabet makes any text encodable, whatever the training texts held.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=SPECIAL_TOKENS[EOS_ID],
                                        bos_token=SPECIAL_TOKENS[EOS_ID], pad_token=SPECIAL_TOKENS[PAD_ID],
                                        model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    architecture: Architecture, vocab_size: int | PreTrainedTokenizerBase, **overrides
) -> PretrainedConfig:
    """A config of the real architecture at toy size: 2 layers, width 64, MLP of 128 (SwiGLU for OLMo).

    `vocab_size` may be a tokenizer, which then gives the size and the pad/bos/eos ids;
    with a number the ids are those `train_tokenizer` assigns.  `overrides` win over all.
    """
    from transformers import GPT2Config, Olmo2Config, OlmoConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not known; use one of {sorted(ARCHITECTURES)}")
    if isinstance(vocab_size, int):
        ids = dict(vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    else:
        ids = dict(vocab_size=len(vocab_size), pad_token_id=vocab_size.pad_token_id,
                   bos_token_id=vocab_size.bos_token_id, eos_token_id=vocab_size.eos_token_id)
    if architecture == "gpt2":  # learned positions, Conv1D layers, LayerNorm with biases, tied embeddings as in GPT-2
        settings = dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512, tie_word_embeddings=True,
                        architectures=[ARCHITECTURES[architecture]], **ids)
        return GPT2Config(**{**settings, **overrides})
    settings = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False, architectures=[ARCHITECTURES[architecture]], **ids,
    )
    config_cls = {"olmo": OlmoConfig, "olmo2": Olmo2Config}[architecture]
    return config_cls(**{**settings, **overrides})


def train_briefly(model, tokenizer, chats: Sequence[list[dict]], steps: int, seed: int) -> None:
    """A few AdamW steps of plain causal-LM training on the chats (every token)."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [encode_sample(tokenizer, chat, "pre", max_length=TRAIN_MAX_TOKENS) for chat in chats]
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(encoded), (TRAIN_BATCH,), generator=generator).tolist()
        ids, labels = pad_batch([encoded[i] for i in pick], tokenizer.pad_token_id)
        loss = sample_losses(model(input_ids=ids).logits, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_tiny_model(
    directory: str | Path,
    architecture: Architecture,
    chats: Iterable[list[dict]],
    *,
    seed: int = 0,
    checkpoints: Sequence[str] = ("checkpoint-0", "checkpoint-1"),
    train_steps: int = 20,
) -> Path:
    """Save a tiny model and its tokenizer as checkpoint subdirectories of `directory`.

    `chats` are conversations (lists of role/content messages): the tokenizer trains on
    their contents and the model on their chat-template renderings.  The first
    checkpoint is the random initialisation; each later one continues from the one
    before with `train_steps` AdamW steps.  Deterministic for a given seed.
    """
    from transformers import AutoModelForCausalLM

    chats = list(chats)
    if not chats or not checkpoints:
        raise ValueError(f"need at least one chat and one checkpoint name; got {len(chats)} chats, "
                         f"checkpoints={list(checkpoints)}")
    directory = Path(directory)
    tokenizer = train_tokenizer(m["content"] for chat in chats for m in chat)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, tokenizer), dtype=torch.float32)
    for index, name in enumerate(checkpoints):
        if index:
            train_briefly(model, tokenizer, chats, train_steps, seed + index)
        # transformers 5 always writes safetensors (model.safetensors).
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
    return directory


@task(name="build-tiny-models", cache_policy=NONE)
def build_tiny_models_task(model_dir: str) -> dict[str, str]:
    """Tiny random-weight OLMo (AMD-OLMo-1B's architecture) and OLMo-2 models, two checkpoints each."""
    from gradlake.tasks.training.tiny import build_tiny_model

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    built = {}
    for arch in ("olmo", "olmo2"):
        target = Path(model_dir) / f"tiny-{arch}"
        if not (target / "checkpoint-1" / "config.json").is_file():
            build_tiny_model(target, arch, chats)
        built[arch] = str(target)
    return built
