"""bfloat16 end to end: a bf16 model's per-sample gradients, stored as bf16 bits or float32, means, and every
projection kind on the fly; read back exactly by gradlake and by the documented plain-numpy recipe."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_probe
from gradlake.lake import open_lake
from gradlake.lake.dtypes import from_bfloat16_bits, to_bfloat16_bits
from gradlake.lake.integrity import read_checked
from gradlake.lake.store import LakeError, LakeStore
from gradlake.lake.verify import verify_lake
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.loss import encode_sample
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.spec import ProjectionSpec
from gradlake.tasks.projection.projectors import project_batch, projectors_for
from test_batching import run

N = 8
LAYERS = ["model.layers.*.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
MATRICES = ["model.layers.*.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_bits_round_like_torch_and_decode_exactly():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                             np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40, 3.3895314e38], dtype=np.float32),
                             # halfway cases: ties go to even
                             (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)])
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(values), want)
    np.testing.assert_array_equal(from_bfloat16_bits(want), torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan, -np.nan], dtype=np.float32)))).all()


def reference(model_dir, probe_chats) -> dict[str, np.ndarray]:
    """Per-sample gradients by plain backward, in float32, of the model with its weights rounded to bfloat16."""
    path = model_dir / "checkpoint-1"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out: dict[str, list] = {}
    for chat in probe_chats[:N]:
        e = encode_sample(tokenizer, chat, "sft", 256)
        model.zero_grad(set_to_none=True)
        model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss.backward()
        for name, p in model.named_parameters():
            out.setdefault(name, []).append(p.grad.flatten().numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


def close(got: np.ndarray, want: np.ndarray, what: str, tol: float = 3e-2) -> None:
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert (err < tol).all(), f"{what}: relative errors {err}"


def spec_for(model_dir, lake, **kw) -> ExtractionSpec:
    model = ModelSpec(model=str(model_dir), checkpoint="checkpoint-1", dtype="bfloat16")
    return ExtractionSpec(model=model, lake=lake, **{**dict(dataset="probe", shard_size=4, batch_size=2, max_length=256), **kw})


def test_bf16_model_store_mean_and_every_projection(tiny_models, probe_chats, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, N)
    want = reference(tiny_models["olmo2"], probe_chats)
    projections = [ProjectionSpec(kind="sparse", scope="flat", dim=256), ProjectionSpec(kind="rademacher", scope="per_tensor", dim=32),
                   ProjectionSpec(kind="gaussian", scope="flat", dim=64), ProjectionSpec(kind="kronecker", dim=16, factors=(4, 4))]
    # Stored as bfloat16 bits, with the dense and sparse projections made on the fly.
    run(spec_for(tiny_models["olmo2"], lake, layers=LAYERS, store_dtype="bfloat16", projections=projections[:3]))
    run(spec_for(tiny_models["olmo2"], lake, variant="paraphrased", layers=MATRICES, store_dtype="float32", projections=projections[3:]))
    run(spec_for(tiny_models["olmo2"], lake, layers=LAYERS, mode="mean"))

    lk = open_lake(lake)
    stored = lk.gradients(dataset="probe", variant="original", mode="store")
    names = [n for n in stored.data_vars if n.startswith("model.")]
    assert len(names) == 4 and all(stored[n].dtype == np.float32 and stored[n].attrs["stored_as"] == "bfloat16" for n in names)
    group_path = lk.find_gradients(dataset="probe", variant="original", mode="store")
    store = LakeStore(lake)
    raw = zarr.open_group(store.zarr_store, path=group_path, mode="r")
    for name in names:
        got = stored[name].values
        close(got, want[name], name)
        # Exactly the stored bits, by gradlake's reader and by the documented recipe.
        bits = raw[name][:]
        assert bits.dtype == np.uint16
        np.testing.assert_array_equal(got, (bits.astype("uint32") << 16).view("float32"))
        np.testing.assert_array_equal(read_checked(raw[name], slice(None)), got)
        assert got[2:5, :7].tolist() == stored[name][2:5, :7].values.tolist()  # lazy selections decode too

    mean = lk.gradients(dataset="probe", variant="original", mode="mean")
    for name in names:
        close(mean[name].values[None], want[name].mean(axis=0)[None], f"mean {name}", tol=1e-2)

    # Each projection group against projecting the reference gradients with the same projectors; the kronecker
    # one (of the paraphrases) against projecting that run's own stored float32 gradients.
    shapes = {n: tuple(raw[n].attrs["param_shape"]) for n in names}
    for proj in projections[:3]:
        expected = project_batch(proj, {n: torch.from_numpy(want[n]) for n in shapes}, projectors_for(proj, shapes))
        got = lk.projections(dataset="probe", variant="original", kind=proj.kind)
        for key, value in expected.items():
            close(got[key].values, value.numpy(), f"{proj.label} {key}")
    paraphrased = lk.gradients(dataset="probe", variant="paraphrased")
    shapes = {n: tuple(paraphrased[n].attrs["param_shape"]) for n in paraphrased.data_vars if n.startswith("model.")}
    assert len(shapes) == 3 and all(paraphrased[n].dtype == np.float32 for n in shapes)
    expected = project_batch(projections[3], {n: torch.from_numpy(paraphrased[n].values) for n in shapes},
                             projectors_for(projections[3], shapes))
    got = lk.projections(dataset="probe", variant="paraphrased", kind="kronecker")
    for key, value in expected.items():
        close(got[key].values, value.numpy(), f"kronecker {key}", tol=1e-2)


def test_bf16_missing_chunk_reads_as_nan_and_is_found(tiny_models, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    group = run(spec_for(tiny_models["olmo2"], lake, layers=["model.norm.weight"], store_dtype="bfloat16"))
    array = group.group["model.norm.weight"]
    assert verify_lake(LakeStore(lake), log=lambda *_: None).set_index("path").loc[group.path, "status"] == "ok"
    os.remove(tmp_path / "lake" / group.path / "model.norm.weight" / "c" / "1" / "0")
    with pytest.raises(LakeError, match="holds NaN"):
        read_checked(array, slice(None))
    assert np.isnan(open_lake(lake).gradients(dataset="probe")["model.norm.weight"].values[2:4]).all()
    findings = verify_lake(LakeStore(lake), log=lambda *_: None)
    assert findings.set_index("path").loc[group.path, "status"] == "damaged", findings
