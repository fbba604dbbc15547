"""An extraction that cannot fit its device is refused at plan time, from the config alone."""

from __future__ import annotations

import pytest
import torch

from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
from gradlake.tasks.gradients.footprint import GiB, device_memory, extraction_floor
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.tiny import tiny_config

# OLMo-2-1124-7B's published shape.
OLMO2_7B = dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def test_floor_counts_weights_buffers_scratch_and_sums():
    shapes = {"a": (4, 5), "b": (7,), "c": (3, 3)}
    need = extraction_floor(shapes, kept=["a", "b"], projected=["a", "b", "c"], model_dtype="bfloat16", batch=3, mean=True)
    assert need == {"weights": (20 + 7 + 9) * 2, "per-sample gradients": 3 * 27 * 2, "projection scratch": 3 * 9 * 2,
                    "float64 sums of a chunk": 27 * 8}
    assert "projection scratch" not in extraction_floor(shapes, ["a"], ["a"], "float32", 2, False)


def test_storing_every_gradient_of_a_7b_model_is_refused_before_anything_is_read(tmp_path):
    model_dir = tmp_path / "olmo2-7b-shape"
    tiny_config("olmo2", OLMO2_7B["vocab_size"], **{k: v for k, v in OLMO2_7B.items() if k != "vocab_size"}).save_pretrained(
        model_dir)  # the config alone: no weights, no tokenizer
    spec = ExtractionSpec(model=ModelSpec(model=str(model_dir), dtype="bfloat16"), lake=f"file://{tmp_path / 'lake'}",
                          batch_size=8)
    need = 7.3e9 * 2 * 9 / GiB  # weights and eight per-sample copies of every parameter, in bf16
    assert need > device_memory(torch.device("cpu")) / GiB  # would hold on any machine this suite runs on
    with pytest.raises(ValueError, match=r"needs at least \d+\.\d GiB on cpu .*weights 13\.6, per-sample gradients 108\.8") as err:
        plan_extraction(spec)
    assert "smaller batch_size" in str(err.value) and "keep_gradients off" in str(err.value)
    assert not (tmp_path / "lake").exists()
