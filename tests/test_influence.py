"""Influence functions with Kronfluence into the lake: against the lake's own gradients, Kronfluence in memory,
and exact inverse-GGN influence on a model small enough to form it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr
from scipy.stats import spearmanr

from conftest import write_probe
from gradlake.lake.scores import ScoreGroup, list_score_groups
from gradlake.lake.store import LakeStore
from gradlake.tasks.influence.spec import InfluenceError, InfluenceSpec
from gradlake.tasks.influence.kronfluence import (collate, linear_from_conv1d, load_factors, tracked_modules, EncodedSet,
    score_args, task_class)
from gradlake.tasks.influence.compute import compute_influence, load_sets, plan_influence
from gradlake.tasks.common.model import ModelSpec

N_TRAIN, N_QUERY = 24, 6
MLP = "model.layers.*.mlp.down_proj.weight"
# The tiny GPT-2's Conv1D modules in model order, written out: c_attn, c_proj in attn; c_fc, c_proj in mlp.
GPT2_CONV1D = [f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("influence-lake"))
    write_probe(url, N_TRAIN)
    return url


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, probe_chats):
    """A tiny GPT-2 (Conv1D layers), checkpoints 'checkpoint-0' and 'checkpoint-1'."""
    from gradlake.tasks.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2", probe_chats)


def spec_for(tiny_models, lake, **overrides) -> InfluenceSpec:
    settings = dict(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1", device="cpu"),
                    lake=lake, dataset="probe", max_queries=N_QUERY, layers=[MLP], max_length=256)
    return InfluenceSpec(**{**settings, **overrides})


def scores_of(lake: str, path: str) -> np.ndarray:
    return ScoreGroup.open(LakeStore(lake), path).read()


def test_identity_scores_are_dot_products_of_the_lakes_gradients(tiny_models, lake):
    from gradlake.flows.extract import extract_gradients
    from gradlake.tasks.gradients.plan import ExtractionSpec

    spec = spec_for(tiny_models, lake, strategy="identity")
    path = compute_influence(spec, log=lambda _: None)
    group = ScoreGroup.open(LakeStore(lake), path)
    assert group.meta["complete"] and group.meta["method"] == "influence-identity"
    lineage = group.meta["lineage"]
    assert (lineage["damping_rule"], lineage["damping_factor"], lineage["converted_conv1d"]) == ("heuristic", None, [])
    assert group.train_ids()[0].startswith("original:") and len(group.query_ids()) == N_QUERY
    grads = {}
    for variant in ("original", "paraphrased"):
        where = extract_gradients(ExtractionSpec(model=spec.model, dataset="probe", variant=variant, layers=[MLP],
                                                 max_length=256, shard_size=N_TRAIN, batch_size=8, lake=lake))
        root = zarr.open_group(LakeStore(lake).zarr_store, path=where, mode="r", zarr_format=3)
        names = sorted(n for n in root.array_keys() if n.endswith("down_proj.weight"))
        assert len(names) == 2
        grads[variant] = (list(root["sample"][:]), np.concatenate([np.asarray(root[n][:], np.float64) for n in names], 1))
    train_ids, train = grads["original"]
    query_ids, queries = grads["paraphrased"]
    assert [f"original:{i}" for i in train_ids] == group.train_ids() and query_ids[:N_QUERY] == group.query_ids()
    dots = queries[:N_QUERY] @ train.T
    np.testing.assert_allclose(group.read(), dots, rtol=2e-3, atol=1e-6 * np.abs(dots).max())
    # A retry on another worker (device 'auto', the model named by a relative path) finds the same group complete.
    said: list[str] = []
    moved = spec.model_copy(update={"model": ModelSpec(model=os.path.relpath(tiny_models["olmo2"]), checkpoint="checkpoint-1",
                                                       device="auto")})
    assert compute_influence(moved, log=said.append) == path
    assert any("complete in the lake; nothing to do" in line for line in said), said


def test_lake_scores_equal_kronfluence_in_memory_and_resume_by_block(tiny_models, lake, tmp_path):
    """EK-FAC scores written in blocks of 10 training samples, interrupted after the first block, resumed."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradlake.tasks.common.loss import encode_sample
    from gradlake.lake.datasets import read_dataset

    spec = spec_for(tiny_models, lake, strategy="ekfac", train_block=10)
    said: list[str] = []

    def crash_after_first_block(line: str) -> None:
        said.append(line)
        if line.startswith("scores block (0, 0) written"):
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        compute_influence(spec, log=crash_after_first_block)
    resumed: list[str] = []
    path = compute_influence(spec, log=resumed.append)
    assert any(l.startswith("factors (ekfac) found in the lake") for l in resumed)
    assert [l.split(":")[0] for l in resumed if l.startswith("scores block")] == ["scores block (0, 1) written",
                                                                                   "scores block (0, 2) written"]
    from_lake = scores_of(lake, path)
    # Kronfluence on its own, all at once, in memory, on the same model, data and settings.
    directory = str(tiny_models["olmo2"] / "checkpoint-1")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    store = LakeStore(lake)
    encode = lambda frame: [encode_sample(tokenizer, m, "sft", 256) for m in frame["messages"]]  # noqa: E731
    train = EncodedSet(encode(read_dataset(store, "probe", "original")))
    queries = EncodedSet(encode(read_dataset(store, "probe", "paraphrased").head(N_QUERY)))
    modules = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    task = task_class()(modules, seed=0)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(directory).eval(), task)
    analyzer = Analyzer("direct", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate(tokenizer.pad_token_id)))
    torch.manual_seed(0)
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(strategy="ekfac"))
    analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=8,
                                     per_device_train_batch_size=8,
                                     score_args=ScoreArguments(damping_factor=None))  # gradlake's default: the heuristic
    direct = analyzer.load_pairwise_scores("s")["all_modules"].numpy()
    # The factors in the lake are Kronfluence's, read back from safetensors.
    meta = ScoreGroup.open(store, path).meta
    factors = load_factors(store, meta["lineage"]["factors"])
    direct_factors = analyzer.load_all_factors("f")
    for kind, per_module in direct_factors.items():
        for module, tensor in per_module.items():
            assert torch.equal(factors[kind][module], tensor), (kind, module)
    np.testing.assert_allclose(from_lake, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
    assert meta["compute_seconds"] > 0 and meta["lake_bytes"] > 0
    assert any(g["path"] == path for g in list_score_groups(store))


def test_every_strategy_runs_and_half_precision_is_close(tiny_models, lake):
    from gradlake.flows.influence import compute_influence_flow

    full = scores_of(lake, compute_influence_flow(spec_for(tiny_models, lake, strategy="kfac")))  # through Prefect
    half = scores_of(lake, compute_influence(spec_for(tiny_models, lake, strategy="kfac", score_dtype="bfloat16",
                                                      method="influence-kfac-bf16"), log=lambda _: None))
    diagonal = scores_of(lake, compute_influence(spec_for(tiny_models, lake, strategy="diagonal"), log=lambda _: None))
    for scores in (full, half, diagonal):
        assert scores.shape == (N_QUERY, N_TRAIN) and np.isfinite(scores).all()
    rho = np.mean([spearmanr(full[i], half[i]).statistic for i in range(N_QUERY)])
    assert rho > 0.95, rho


@pytest.mark.parametrize("change, message", [
    ({"strategy": "lissa"}, "strategy 'lissa' is not one Kronfluence knows; use one of"),
    ({"layers": ["model.layers.*.mlp.nothing.weight"]}, "layer pattern 'model.layers.\\*.mlp.nothing.weight' matches no nn.Linear"),
    ({"layers": ["model.layers.*.input_layernorm.weight"]}, "matches no nn.Linear weight"),
    ({"queries": "model_generated"}, "dataset 'probe' variant 'model_generated' is not in lake"),
    ({"train_ids": ["nope"]}, "train_ids \\['nope'\\] are not in dataset 'probe'"),
    ({"query_ids": ["nope", "probe-9999"]}, "query_ids \\['nope', 'probe-9999'\\] \\(2 of 2\\) are not in dataset 'probe' "
                                          "variant 'paraphrased'; its ids look like \\['probe-0001'"),
    ({"query_ids": ["probe-0001", "probe-0001"]}, "query_ids repeat \\['probe-0001'\\]: give each id once"),
    ({"damping": "huge"}, "damping 'huge' is neither a number >= 0 nor one of \\['heuristic', 'kronfluence'\\]"),
    ({"damping": -1.0}, "damping -1.0 is neither a number >= 0"),
])
def test_bad_input_is_one_clear_error_before_any_write(tiny_models, lake, tmp_path, change, message):
    before = sorted(LakeStore(lake).glob("attribution/**"))
    with pytest.raises(ValueError, match=message):
        compute_influence(spec_for(tiny_models, lake, **change), log=lambda _: None)
    assert sorted(LakeStore(lake).glob("attribution/**")) == before


def test_strategies_against_exact_inverse_ggn_influence(tmp_path):
    """On a 1-layer OLMo-2 of width 16, one tracked MLP projection (512 weights): the exact damped GGN is formed
    from Jacobians, and each strategy's scores are rank-correlated with the exact influence."""
    from torch.func import functional_call, jacfwd
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.common.loss import encode_sample, pad_batch, sample_losses
    from gradlake.tasks.data.probes import load_probe_set, probe_variant, store_probe_set
    from gradlake.tasks.training.tiny import train_briefly, tiny_config, train_tokenizer

    frame = load_probe_set().head(N_TRAIN)
    chats = list(probe_variant(frame, "original")["messages"])
    query_chats = list(probe_variant(frame, "paraphrased")["messages"])[:8]
    tokenizer = train_tokenizer([m["content"] for c in chats for m in c])
    torch.manual_seed(0)
    config = tiny_config("olmo2", tokenizer, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    train_briefly(model, tokenizer, chats, 60, 0)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    lake = str(tmp_path / "lake")
    store_probe_set(lake, "probe", N_TRAIN)
    module = "model.layers.0.mlp.down_proj"
    weight = dict(model.named_parameters())[f"{module}.weight"]
    n = weight.numel()
    encode = lambda cs: [encode_sample(tokenizer, c, "sft", 96) for c in cs]  # noqa: E731

    def gradient(e) -> torch.Tensor:
        ids, labels = pad_batch([e], tokenizer.pad_token_id)
        model.zero_grad()
        sample_losses(model(input_ids=ids).logits, labels).sum().backward()
        return weight.grad.detach().reshape(-1).double().clone()

    train = torch.stack([gradient(e) for e in encode(chats)])
    queries = torch.stack([gradient(e) for e in encode(query_chats)])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits_of(w, ids):
        return functional_call(model, {**params, f"{module}.weight": w}, (ids,)).logits[0]

    # GGN of the mean training loss: mean over samples of mean over label tokens of J^T (diag p - p p^T) J.
    ggn = torch.zeros(n, n, dtype=torch.float64)
    for e in encode(chats):
        ids, labels = pad_batch([e], tokenizer.pad_token_id)
        jac = jacfwd(logits_of)(weight.detach(), ids).reshape(ids.shape[1], -1, n).double()
        logits = logits_of(weight.detach(), ids).double()
        positions = [t for t in range(ids.shape[1] - 1) if labels[0, t + 1] != -100]
        for t in positions:
            p = torch.softmax(logits[t], -1)
            ggn += jac[t].T @ (torch.diag(p) - torch.outer(p, p)) @ jac[t] / len(positions)
    ggn /= len(chats)
    damping = 0.1 * torch.linalg.eigvalsh(ggn).mean()  # Kronfluence's heuristic, on the exact matrix
    exact = (queries @ torch.linalg.solve(ggn + damping * torch.eye(n, dtype=torch.float64), train.T)).numpy()
    rho = {}
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        spec = InfluenceSpec(model=ModelSpec(model=str(tmp_path / "m"), device="cpu"), lake=lake, dataset="probe",
                             strategy=strategy, max_queries=8, layers=[f"{module}.weight"], max_length=96)
        scores = scores_of(lake, compute_influence(spec, log=lambda _: None))
        rho[strategy] = float(np.mean([spearmanr(scores[i], exact[i]).statistic for i in range(8)]))
    print("mean Spearman with exact inverse-GGN influence:", {k: round(v, 3) for k, v in rho.items()})
    assert rho["ekfac"] > 0.6 and rho["kfac"] > 0.6, rho
    assert rho["ekfac"] > rho["identity"] + 0.1 and rho["kfac"] > rho["diagonal"] + 0.1, rho


# ---------------------------------------------------------------- GPT-2's Conv1D, layer keywords, damping, query ids

def test_conv1d_becomes_an_equal_linear():
    """The converted module computes what GPT-2's Conv1D computed, in its dtype; other modules are left alone."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(6, 4), torch.nn.GELU(), torch.nn.Sequential(Conv1D(3, 6))).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    before = model(x)
    assert linear_from_conv1d(model) == ["0", "2.0"]
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2][0], torch.nn.Linear)
    assert model[0].weight.shape == (6, 4) and model[0].weight.dtype == torch.float64
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("architecture", ["olmo", "olmo2", "llama", "qwen2", "gpt2"])
def test_layer_keywords_choose_each_blocks_attention_and_mlp(architecture):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from gradlake.tasks.training.tiny import tiny_config

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
    config = {"llama": lambda: LlamaConfig(**sizes), "qwen2": lambda: Qwen2Config(**sizes)}.get(
        architecture, lambda: tiny_config(architecture, 512))()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    converted = linear_from_conv1d(model)
    if architecture == "gpt2":
        attention, mlp = [n for n in GPT2_CONV1D if ".attn." in n], [n for n in GPT2_CONV1D if ".mlp." in n]
        assert converted == GPT2_CONV1D
    else:
        attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
        mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")]
        assert converted == []
    assert tracked_modules(model, ["attention"]) == attention
    assert tracked_modules(model, ["mlp"]) == mlp
    # keywords and globs together, in model order
    chosen = set(attention + mlp + ["lm_head"])
    assert tracked_modules(model, ["mlp", "attention", "lm_head.weight"]) == [
        n for n, m in model.named_modules() if n in chosen]


def test_a_layer_keyword_or_pattern_that_matches_nothing_names_itself():
    with pytest.raises(InfluenceError, match="layer keyword 'mlp' matches no nn.Linear weight inside a block's MLP "
                                             "\\('<block>.mlp.'\\); names look like '0.weight', '1.weight'"):
        tracked_modules(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), ["mlp"])
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.training.tiny import tiny_config

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2", 512))
    linear_from_conv1d(gpt2)
    with pytest.raises(InfluenceError, match="layer pattern 'transformer.h.\\*.attn.q_proj.weight' matches no nn.Linear "
                                             "weight Kronfluence can track; names look like 'transformer.h.0.attn.c_attn.weight'"):
        tracked_modules(gpt2, ["transformer.h.*.attn.q_proj.weight"])


def test_gpt2_identity_scores_are_dot_products_of_plain_backward_gradients(tiny_gpt2, lake):
    """Kronfluence on the converted Conv1D against loss.backward() per sample on the original GPT-2 (Conv1D)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from gradlake.lake.datasets import read_dataset
    from gradlake.tasks.common.loss import encode_sample, pad_batch, sample_losses

    layers = ["transformer.h.*.attn.c_attn.weight", "transformer.h.*.mlp.*.weight"]
    spec = InfluenceSpec(model=ModelSpec(model=str(tiny_gpt2), checkpoint="checkpoint-1", device="cpu"), lake=lake,
                         dataset="probe", max_queries=N_QUERY, strategy="identity", layers=layers, max_length=256)
    group = ScoreGroup.open(LakeStore(lake), compute_influence(spec, log=lambda _: None))
    tracked = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    assert group.meta["lineage"]["tracked_modules"] == tracked
    assert group.meta["lineage"]["converted_conv1d"] == GPT2_CONV1D
    assert group.meta["settings"]["converted_conv1d"] == tracked
    directory = tiny_gpt2 / "checkpoint-1"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    modules = [model.get_submodule(name) for name in tracked]
    assert all(isinstance(m, Conv1D) for m in modules)
    # Kronfluence's tracked Linear carries its bias (a column of ones on the inputs): weight and bias both count.
    params = [p for m in modules for p in (m.weight, m.bias)]

    def gradient(chat) -> torch.Tensor:
        ids, labels = pad_batch([encode_sample(tokenizer, chat, "sft", 256)], tokenizer.pad_token_id)
        model.zero_grad()
        sample_losses(model(input_ids=ids).logits, labels).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).double()

    store = LakeStore(lake)
    train = torch.stack([gradient(c) for c in read_dataset(store, "probe", "original")["messages"]])
    queries = torch.stack([gradient(c) for c in read_dataset(store, "probe", "paraphrased")["messages"][:N_QUERY]])
    dots = (queries @ train.T).numpy()
    np.testing.assert_allclose(group.read(), dots, rtol=2e-3, atol=1e-6 * np.abs(dots).max())


def test_gpt2_ekfac_on_attention_and_mlp_by_keyword(tiny_gpt2, lake):
    spec = InfluenceSpec(model=ModelSpec(model=str(tiny_gpt2), checkpoint="checkpoint-1", device="cpu"), lake=lake,
                         dataset="probe", max_queries=N_QUERY, strategy="ekfac", layers=["attention", "mlp"],
                         max_length=256)
    plan = plan_influence(spec)
    assert plan["modules"] == GPT2_CONV1D and plan["converted_conv1d"] == GPT2_CONV1D
    path = compute_influence(spec, log=lambda _: None)
    scores = scores_of(lake, path)
    assert scores.shape == (N_QUERY, N_TRAIN) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    meta = ScoreGroup.open(LakeStore(lake), path).meta
    assert meta["lineage"]["tracked_modules"] == GPT2_CONV1D
    for kind, per_module in load_factors(LakeStore(lake), meta["lineage"]["factors"]).items():
        assert sorted(per_module) == sorted(GPT2_CONV1D), kind


def test_damping_rules_are_explicit_and_recorded(tiny_models, lake):
    from kronfluence.arguments import ScoreArguments

    default = ScoreArguments().damping_factor
    assert default == 1e-08  # Kronfluence 1.0.1's own default
    assert score_args(spec_for(tiny_models, lake, damping="kronfluence")).damping_factor == default
    for damping in (None, "heuristic"):
        assert score_args(spec_for(tiny_models, lake, damping=damping)).damping_factor is None
    assert score_args(spec_for(tiny_models, lake, damping=0.25)).damping_factor == 0.25
    # the rule and the number reach the lake, and the number reaches the scores: EK-FAC differs from the heuristic
    heuristic = compute_influence(spec_for(tiny_models, lake, strategy="ekfac"), log=lambda _: None)
    tiny = compute_influence(spec_for(tiny_models, lake, strategy="ekfac", damping="kronfluence",
                                      method="influence-ekfac-kronfluence-damping"), log=lambda _: None)
    store = LakeStore(lake)
    meta = ScoreGroup.open(store, tiny).meta
    assert (meta["lineage"]["damping_rule"], meta["lineage"]["damping_factor"]) == ("kronfluence", default)
    assert meta["settings"]["damping"] == default
    assert ScoreGroup.open(store, heuristic).meta["lineage"]["damping_rule"] == "heuristic"
    assert not np.allclose(scores_of(lake, tiny), scores_of(lake, heuristic), rtol=0.05)


def test_query_ids_choose_and_order_held_out_queries(tiny_models, lake):
    """Held-out samples of the training variant as queries: the rows of the all-pairs matrix, in the order asked."""
    from gradlake.lake.datasets import read_dataset

    ids = [str(i) for i in read_dataset(LakeStore(lake), "probe", "original")["id"]]
    held_out, trained = ids[-4:][::-1], ids[:-4]
    every = compute_influence(spec_for(tiny_models, lake, strategy="identity", queries="original", max_queries=None,
                                       method="influence-identity-all-pairs"), log=lambda _: None)
    spec = spec_for(tiny_models, lake, strategy="identity", queries="original", max_queries=None, query_ids=held_out,
                    train_ids=trained, method="influence-identity-held-out")
    group = ScoreGroup.open(LakeStore(lake), compute_influence(spec, log=lambda _: None))
    assert group.query_ids() == held_out and group.train_ids() == [f"original:{i}" for i in trained]
    assert group.meta["settings"]["query_ids"] == held_out
    full = scores_of(lake, every)
    expected = full[[ids.index(i) for i in held_out]][:, [ids.index(i) for i in trained]]
    np.testing.assert_allclose(group.read(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # max_queries applies after query_ids
    assert load_sets(spec.model_copy(update={"max_queries": 2}))[2] == held_out[:2]


def test_factor_fitting_and_scoring_say_their_progress(tiny_models, lake, tmp_path, monkeypatch):
    """Each EK-FAC phase logs its start and end, and every batch through a loss is counted: a fit that runs for
    minutes is never silent (progress every PROGRESS_EVERY seconds; here 0, so after every batch)."""
    import gradlake.tasks.influence.compute as compute

    monkeypatch.setattr(compute, "PROGRESS_EVERY", 0.0)
    said: list[str] = []
    # a lake of its own: factors another test fitted would be reused, and nothing fitted
    own = str(tmp_path / "lake")
    write_probe(own, N_TRAIN)
    compute_influence(spec_for(tiny_models, own, strategy="ekfac", train_batch_size=8), log=said.append)
    phases = [line.split(":")[0] for line in said if line.endswith(": started") or ": started (" in line]
    assert phases == ["ekfac covariance matrices", "ekfac eigendecomposition", "ekfac lambda matrices",
                      "scoring block (0, 0)"]
    for name in phases:
        assert any(line.startswith(f"{name}: done in ") for line in said), name
    # every training sample once through the loss per pass over the data, in batches of 8
    for name in ("ekfac covariance matrices", "ekfac lambda matrices"):
        counts = [line.split(": ", 1)[1].split(" ")[0] for line in said if line.startswith(f"{name}: ") and "/" in line]
        assert counts == [f"{n}/{N_TRAIN}" for n in (8, 16, 24)], said
    # scores: the queries once, then every training sample for the one batch of queries
    last = [line for line in said if line.startswith("scoring block (0, 0): ") and "/" in line][-1]
    assert last.split(": ", 1)[1].startswith(f"{N_QUERY + N_TRAIN}/{N_QUERY + N_TRAIN} samples"), last


# ---------------------------------------------------------------- factors and score metadata read back from the lake

def _factored_lake(tiny_models, tmp_path) -> tuple[str, str, str]:
    """A lake with identity factors and their scores: (lake, factors directory, score group path)."""
    lake = str(tmp_path / "lake")
    write_probe(lake, 8)
    path = compute_influence(spec_for(tiny_models, lake, strategy="identity", max_queries=2), log=lambda _: None)
    factors = ScoreGroup.open(LakeStore(lake), path).meta["lineage"]["factors"]
    return lake, f"{lake}/{factors}", path


def _influence_cli(tiny_models, lake: str, *extra: str):
    from typer.testing import CliRunner

    from gradlake.flows.cli import app

    result = CliRunner().invoke(app, ["influence", "--model", str(tiny_models["olmo2"]), "--checkpoint", "checkpoint-1",
                                      "--device", "cpu", "--lake", lake, "--dataset", "probe", "--strategy", "identity",
                                      "--layers", MLP, "--max-queries", "2", "--max-length", "256", *extra])
    return result.exit_code, result.output


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_factor_names_read_from_the_lake_stay_inside_their_directory(tiny_models, tmp_path, keep_manifest):
    """A `files` entry naming an absolute path or climbing out with '..' is refused; nothing is written outside."""
    import json

    from gradlake.lake.manifest import entry, read_manifest, write_manifest

    lake, factors, _ = _factored_lake(tiny_models, tmp_path)
    outside, climbed = tmp_path / "outside.json", tmp_path / "escaped.json"
    record = json.loads(open(f"{factors}/factors.json").read())
    assert record["files"] and all(os.path.exists(f"{factors}/{name}") for name in record["files"])
    record["files"] += [str(outside), "../" * 12 + str(climbed).lstrip("/")]
    planted = f"{factors}/{str(outside).lstrip('/')}"  # where '<factors>/' + the absolute name leads, in the lake
    os.makedirs(os.path.dirname(planted))
    open(planted, "w").write("{}")
    raw = json.dumps(record).encode()
    open(f"{factors}/factors.json", "wb").write(raw)
    fs = LakeStore(lake).fs
    if keep_manifest:  # a tamperer who rewrote the manifest too
        write_manifest(fs, factors, {**(read_manifest(fs, factors) or {}), "factors.json": entry(raw)})
    elif os.path.exists(f"{factors}/manifest.json"):  # a lake written before factors had a manifest
        os.remove(f"{factors}/manifest.json")
    code, out = _influence_cli(tiny_models, lake, "--method", "again")
    assert code == 2 and "not a plain relative path inside its directory" in out and repr(str(outside)) in out, out
    assert "Traceback" not in out and out.count("error:") == 1
    assert not outside.exists() and not climbed.exists()


@pytest.mark.parametrize("damaged", ["factors.json", "a factor file", "the score group's zarr.json"])
def test_damaged_factors_or_score_metadata_end_in_one_error_line(tiny_models, tmp_path, damaged):
    import json

    lake, factors, path = _factored_lake(tiny_models, tmp_path)
    manifest = json.loads(open(f"{factors}/manifest.json").read())["files"]
    others = sorted(set(manifest) - {"factors.json"})
    assert "factors.json" in manifest and others, manifest  # every file of the factors has a digest
    target = {"factors.json": f"{factors}/factors.json", "a factor file": f"{factors}/{others[0]}",
              "the score group's zarr.json": f"{lake}/{path}/zarr.json"}[damaged]
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: still parses for a factor file, wrong for its digest
    open(target, "wb").write(bytes(data) if damaged != "the score group's zarr.json" else b"{ not json")
    method = [] if damaged == "the score group's zarr.json" else ["--method", "again"]  # the factors are read back
    code, out = _influence_cli(tiny_models, lake, *method)
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert target.rsplit("/", 1)[-1] in lines[0] and ("gradlake verify" in lines[0] or "rerun" in lines[0]), lines[0]
