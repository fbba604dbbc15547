"""Tiny models of the real architectures, built offline for the tests and the demo.

Nothing is downloaded: a byte-level BPE tokenizer is trained on the chats given, with
an OLMo/Tulu-style chat template, and random-weight ``OlmoForCausalLM`` (AMD-OLMo-1B's
architecture) or ``Olmo2ForCausalLM`` (OLMo-2-7B's) models are saved as checkpoint
directories that ``from_pretrained`` loads like any other.  Later checkpoints are the
earlier ones trained a few steps further, so checkpoints really differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from tasks.loss import encode_sample, pad_batch, sample_losses

Architecture = Literal["olmo", "olmo2"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
# The Tulu/OLMo layout: a role tag line, the content, and an end-of-text after each answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(chats: Sequence[list[dict]], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the chats' contents, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator((m["content"] for chat in chats for m in chat), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<|pad|>", model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(architecture: Architecture, tokenizer, **overrides):
    """A config of the real architecture at toy size: 2 layers, width 64, SwiGLU MLP of 128."""
    from transformers import Olmo2Config, OlmoConfig

    configs = {"olmo": (OlmoConfig, "OlmoForCausalLM"), "olmo2": (Olmo2Config, "Olmo2ForCausalLM")}
    if architecture not in configs:
        raise ValueError(f"architecture {architecture!r} is not known; use one of {sorted(configs)}")
    config_cls, class_name = configs[architecture]
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        architectures=[class_name],
    )
    return config_cls(**{**settings, **overrides})


def _train(model, tokenizer, chats: Sequence[list[dict]], steps: int, seed: int) -> None:
    """A few AdamW steps of plain causal-LM training on the chats (every token)."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [encode_sample(tokenizer, chat, "pre", max_length=128) for chat in chats]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(encoded), (4,), generator=generator).tolist()
        ids, labels = pad_batch([encoded[i] for i in pick], tokenizer.pad_token_id)
        loss = sample_losses(model(input_ids=ids).logits, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_tiny_model(
    directory: str | Path,
    architecture: Architecture,
    chats: Sequence[list[dict]],
    *,
    seed: int = 0,
    checkpoints: Sequence[str] = ("checkpoint-0", "checkpoint-1"),
    train_steps: int = 20,
) -> Path:
    """Save a tiny model and its tokenizer as checkpoint subdirectories of `directory`.

    The first checkpoint is the random initialisation; each later one continues from
    the one before with `train_steps` training steps.  Deterministic for a given seed.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = train_tokenizer(chats)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, tokenizer)).float()
    for index, name in enumerate(checkpoints):
        if index:
            _train(model, tokenizer, chats, train_steps, seed + index)
        target = directory / name
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    return directory
