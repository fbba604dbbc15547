"""What is compared: a parameter tensor's block and part, and the layer groups built from them (each block's attention and MLP, all attention, all MLP, embeddings)."""

from __future__ import annotations

import re

from gradlake.tasks.gradients.engine import INPUTS_EMBEDS


_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def tensor_part(name: str) -> tuple[int | None, str]:
    """(block index or None, part): attention, mlp, norm, embeddings, lm_head, inputs_embeds or other."""
    if name == INPUTS_EMBEDS:
        return None, INPUTS_EMBEDS
    match = _BLOCK.search(name)
    block = int(match.group(1)) if match else None
    if "embed_tokens" in name or "wte" in name:
        return block, "embeddings"
    if name.startswith("lm_head"):
        return block, "lm_head"
    if "norm" in name:
        return block, "norm"
    if ".self_attn." in name or ".attn." in name:
        return block, "attention"
    if ".mlp." in name:
        return block, "mlp"
    return block, "other"


def layer_groups(names: list[str]) -> dict[str, list[str]]:
    """Each block's attention and MLP, all attention, all MLP, embeddings, and the full gradient."""
    groups: dict[str, list[str]] = {}
    for name in names:
        block, part = tensor_part(name)
        if part in ("attention", "mlp") and block is not None:
            groups.setdefault(f"block{block}.{part}", []).append(name)
            groups.setdefault(part, []).append(name)
        elif part == "embeddings":
            groups.setdefault("embeddings", []).append(name)
    groups["full"] = list(names)
    return {g: members for g, members in groups.items() if members}
