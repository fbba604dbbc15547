"""Model tracing on the tiny models: permutations keep the function, alignment undoes them exactly, and the
statistics tell a fine-tune from an independently initialised model, each against a direct computation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradlake.lake.store import LakeStore
from gradlake.tasks.common.loss import encode_sample, pad_batch
from gradlake.tasks.training.tiny import build_tiny_model
from gradlake.tasks.tracing.permutation import TracingError, align, permutation_axes, permute_model, random_permutation
from gradlake.tasks.tracing.connectivity import barrier, loss_path, token_loss
from gradlake.tasks.tracing.statistics import (embedding_cosine, matching_test, mean_weight_cosine, null_statistics,
    permutation_p_value, weight_cosines)

PERMUTATIONS = 199  # the smallest p-value is 1/200


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def family(tiny_models, probe_chats, tmp_path_factory):
    """Per architecture: a base (checkpoint-1), its fine-tune (20 more steps), an independent model (another seed,
    trained as long as the base), and evaluation batches."""
    root = tmp_path_factory.mktemp("tracing")
    out = {}
    for arch in ("olmo", "olmo2"):
        longer = build_tiny_model(root / f"{arch}-longer", arch, probe_chats,
                                  checkpoints=("checkpoint-0", "checkpoint-1", "checkpoint-2"))
        other = build_tiny_model(root / f"{arch}-other", arch, probe_chats, seed=1)
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch] / "checkpoint-1")
        encoded = [encode_sample(tokenizer, chat, "sft", 256) for chat in probe_chats[:16]]
        batches = [pad_batch(encoded[i:i + 4], tokenizer.pad_token_id) for i in range(0, 16, 4)]
        out[arch] = {"base": load(tiny_models[arch] / "checkpoint-1"), "fine_tune": load(longer / "checkpoint-2"),
                     "independent": load(other / "checkpoint-1"), "batches": batches,
                     "dirs": {"base": tiny_models[arch], "fine_tune": longer, "independent": other}}
        same = dict(load(longer / "checkpoint-1").named_parameters())
        assert all(torch.equal(p, same[n]) for n, p in out[arch]["base"].named_parameters()), "the fine-tune's base"
    return out


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
def test_permuted_model_computes_the_same_logits_and_alignment_finds_the_inverse(family, arch):
    base = family[arch]["base"]
    shuffled = permute_model(copy.deepcopy(base), random_permutation(base, seed=7))
    permutation = random_permutation(base, seed=7)
    moved = {n for n, p in base.named_parameters() if not torch.equal(p, dict(shuffled.named_parameters())[n])}
    unmoved = {n for n, _ in base.named_parameters()} - moved
    assert moved == set(permutation_axes(base)), "exactly the parameters the permutation acts on move"
    assert all(".q_norm." in n or ".k_norm." in n for n in unmoved), unmoved  # the attention's own norms stay
    for ids, _ in family[arch]["batches"]:
        with torch.no_grad():
            want, got = base(input_ids=ids).logits, shuffled(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    found = align(base, shuffled)
    assert torch.equal(found.hidden, torch.argsort(permutation.hidden))
    assert all(torch.equal(f, torch.argsort(p)) for f, p in zip(found.mlp, permutation.mlp))
    restored = permute_model(copy.deepcopy(shuffled), found)
    assert all(torch.equal(p, dict(restored.named_parameters())[n]) for n, p in base.named_parameters())


def test_statistics_against_direct_computation(family):
    base, other = family["olmo2"]["base"], family["olmo2"]["fine_tune"]
    cosines = weight_cosines(base, other)
    for name, p in base.named_parameters():
        a = p.detach().double().flatten().numpy()
        b = dict(other.named_parameters())[name].detach().double().flatten().numpy()
        assert math.isclose(cosines[name], a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel_tol=1e-12)
    e_a = base.get_input_embeddings().weight.detach().double().numpy()
    e_b = other.get_input_embeddings().weight.detach().double().numpy()
    assert (np.linalg.norm(e_a, axis=1) == 0).sum() == 1, "the padding row has no direction"
    direct = np.mean([u @ v / np.linalg.norm(u) / np.linalg.norm(v) for u, v in zip(e_a, e_b) if u.any() and v.any()])
    assert math.isclose(embedding_cosine(base, other), direct, rel_tol=1e-12)
    # token-weighted loss: each sample's transformers loss times its label count, over all label tokens
    total = count = 0.0
    for ids, labels in family["olmo2"]["batches"]:
        for row in range(ids.shape[0]):
            n = int((labels[row, 1:] != -100).sum())
            with torch.no_grad():
                total += base(input_ids=ids[row:row + 1], labels=labels[row:row + 1]).loss.item() * n
            count += n
    assert math.isclose(token_loss(base, family["olmo2"]["batches"]), total / count, rel_tol=1e-5)
    path = [(0.0, 2.0), (0.25, 2.5), (0.5, 3.5), (0.75, 2.2), (1.0, 1.0)]
    assert math.isclose(barrier(path), max(l - (2.0 - a) for a, l in path))  # the line from 2.0 to 1.0
    assert permutation_p_value(0.9, [0.1, 0.95, 0.2]) == 2 / 4 and permutation_p_value(0.1, [0.2, 0.3], False) == 1 / 3


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
def test_derived_is_told_from_independent_and_permutation_does_not_hide_it(family, arch):
    f = family[arch]
    base = f["base"]
    hidden_copy = permute_model(copy.deepcopy(f["fine_tune"]), random_permutation(base, seed=11))

    def unaligned(candidate):
        observed = mean_weight_cosine(base, candidate)
        return observed, permutation_p_value(observed, null_statistics(mean_weight_cosine, base, candidate, PERMUTATIONS, 0))

    cos_fine, p_fine = unaligned(f["fine_tune"])
    cos_other, p_other = unaligned(f["independent"])
    cos_hidden, p_hidden = unaligned(hidden_copy)
    assert p_fine == 1 / (PERMUTATIONS + 1) and cos_fine > 0.5, (cos_fine, p_fine)
    assert p_other > 0.05 and abs(cos_other) < 0.1, (cos_other, p_other)
    assert p_hidden > 0.05 and abs(cos_hidden) < 0.1, "a permuted fine-tune fools the unaligned cosine"
    aligned = mean_weight_cosine(base, hidden_copy, align(base, hidden_copy))
    assert math.isclose(aligned, cos_fine, rel_tol=1e-9), "alignment recovers the fine-tune's own cosine"
    for candidate, derived in ((f["fine_tune"], True), (hidden_copy, True), (f["independent"], False)):
        result = matching_test(base, candidate, PERMUTATIONS)
        assert (result["p_value"] < 0.01) == derived, (derived, result)


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
def test_mode_connectivity_low_for_a_fine_tune_and_a_barrier_for_an_independent_model(family, arch):
    f = family[arch]
    derived = loss_path(f["base"], f["fine_tune"], f["batches"], 5)
    independent = loss_path(f["base"], f["independent"], f["batches"], 5)
    assert [a for a, _ in derived] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert math.isclose(derived[0][1], token_loss(f["base"], f["batches"]), rel_tol=1e-9)
    assert math.isclose(derived[-1][1], token_loss(f["fine_tune"], f["batches"]), rel_tol=1e-9)
    mid = independent[2][1]
    assert mid > max(independent[0][1], independent[-1][1]), independent
    assert barrier(derived) < 0.1 * barrier(independent), (derived, independent)
    # the permuted fine-tune has the barrier of an unrelated model until it is aligned
    shuffled = permute_model(copy.deepcopy(f["fine_tune"]), random_permutation(f["base"], seed=3))
    assert barrier(loss_path(f["base"], shuffled, f["batches"], 3)) > 5 * barrier(derived)
    realigned = loss_path(f["base"], shuffled, f["batches"], 5, align(f["base"], shuffled))
    np.testing.assert_allclose([l for _, l in realigned], [l for _, l in derived], rtol=1e-4)
    with pytest.raises(TracingError, match="interpolation points 1 must be 2 or more"):
        loss_path(f["base"], f["fine_tune"], f["batches"], 1)


def test_trace_flow_writes_a_verdict_tables_and_a_plot_to_the_lake(family, tmp_path):
    """The trace-models flow on a permuted fine-tune and on an independent model: verdicts, lake outputs, catalog, reader."""
    import json

    from conftest import write_probe
    from gradlake.flows.trace import TraceManySpec, trace_many, trace_models
    from gradlake.lake import open_lake
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.tracing.trace import TraceSpec, tracing_dir

    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 8)
    dirs = family["olmo2"]["dirs"]
    base = ModelSpec(model=str(dirs["base"]), checkpoint="checkpoint-1")
    common = dict(base=base, n_samples=8, max_length=256, points=3, permutations=99, lake=lake)
    derived_dir = trace_models(TraceSpec(candidate=ModelSpec(model=str(dirs["fine_tune"]), checkpoint="checkpoint-2"),
                                         permute=True, permute_seed=5, **common))
    # the many-pairs mode, in-process: its summary covers every candidate traced against the base so far
    independent = ModelSpec(model=str(dirs["independent"]), checkpoint="checkpoint-1")
    summary_dir = trace_many(TraceManySpec(candidates=[independent], statistics=["cos"], trace_deployment=None, **common))
    independent_dir = tracing_dir(TraceSpec(candidate=independent, **common))
    summary = open_lake(lake).tracing_summary(base=str(dirs["base"]), base_checkpoint="checkpoint-1")
    assert summary_dir == independent_dir.rsplit("/", 2)[0]
    assert sorted(summary["path"]) == sorted([derived_dir, independent_dir])
    assert list(summary.sort_values("path")["derived"]) == [p == derived_dir for p in sorted(summary["path"])]
    opened = open_lake(lake)
    store = opened.store
    meta = {d: json.loads(store.fs.cat_file(store.path(f"{d}/meta.json"))) for d in (derived_dir, independent_dir)}
    assert meta[derived_dir]["verdict"].startswith("derived (p = ") and meta[derived_dir]["summary"]["derived"]
    assert meta[derived_dir]["verdict"].endswith("; control: candidate permuted with seed 5")
    assert meta[independent_dir]["verdict"].startswith("no evidence of derivation")
    lineage = meta[derived_dir]["lineage"]
    assert lineage["permute_seed"] == 5 and lineage["test_seed"] == 0 and lineage["settings"]["permutations"] == 99
    assert lineage["base"]["resolved_commit"].startswith("sha256:") and lineage["candidate"]["resolved_commit"] != lineage["base"]["resolved_commit"]
    from gradlake.lake.datasets import dataset_meta
    assert lineage["dataset_version"] == dataset_meta(store, "probe", "original")["version"]

    results = opened.tracing(candidate=str(dirs["fine_tune"]), candidate_checkpoint="checkpoint-2-permuted-s5")
    cos = results.set_index(["statistic", "aligned"])
    assert cos.loc[("cos", False), "p_value"] > 0.05, "the permuted fine-tune fools the unaligned cosine"
    assert cos.loc[("cos", True), "p_value"] < 0.01 and cos.loc[("cos", True), "value"] > 0.5
    path = opened.tracing(candidate=str(dirs["fine_tune"]), table="path")
    assert sorted(path["alpha"].unique()) == [0.0, 0.5, 1.0] and set(path["aligned"]) == {False, True}
    aligned = path[path["aligned"]].sort_values("alpha")["loss"].to_numpy()
    unaligned = path[~path["aligned"]].sort_values("alpha")["loss"].to_numpy()
    assert unaligned[1] > aligned[1], "unaligned, the midpoint of a permuted fine-tune is a different, worse model"
    assert np.isclose(cos.loc[("perplexity:base", False), "value"], math.exp(aligned[0]), rtol=1e-9)
    for name in ("loss_path.png", "layers.png"):
        assert store.fs.cat_file(store.path(f"{derived_dir}/plots/{name}"))[:8] == b"\x89PNG\r\n\x1a\n"
    from gradlake.lake.results import read_result_table
    layers = {d: read_result_table(store, d, "layers") for d in (derived_dir, independent_dir)}
    assert list(layers[derived_dir]["agreements"]) == [128, 128] and (layers[derived_dir]["p_value"] == 0.01).all()
    assert (layers[independent_dir]["agreements"] < 10).all() and (layers[derived_dir]["cos"] < 0.1).all()
    assert (layers[derived_dir]["cos_aligned"] > 0.5).all()
    assert "layers.png" in store.fs.cat_file(store.path(f"{derived_dir}/report.html")).decode()
    assert not store.fs.glob(store.path("tracing/**/*.pkl")) and not store.fs.glob(store.path("tracing/**/*.pt"))
    rows = opened.catalog().query("kind == 'tracing'")
    assert set(rows["path"]) == {derived_dir, independent_dir} and rows["verdict"].notna().all()
    with pytest.raises(Exception, match="2 tracing results match"):
        opened.tracing(base=str(dirs["base"]))


def test_bad_tracing_inputs_fail_before_any_weight_is_loaded(family, tiny_models, tmp_path):
    from pydantic import ValidationError

    from conftest import write_probe
    from gradlake.lake.store import LakeError
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.training.tiny import tiny_config
    from gradlake.tasks.tracing.trace import TraceSpec, plan_trace

    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    olmo2 = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    olmo = ModelSpec(model=str(tiny_models["olmo"]), checkpoint="checkpoint-1")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["olmo2"] / "checkpoint-1")
    narrow = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(tiny_config("olmo2", tokenizer, intermediate_size=96)).save_pretrained(narrow)
    tokenizer.save_pretrained(narrow)
    with pytest.raises(TracingError, match="the base is a Olmo2ForCausalLM and the candidate a OlmoForCausalLM"):
        plan_trace(TraceSpec(base=olmo2, candidate=olmo, lake=lake))
    with pytest.raises(TracingError, match=r"mlp.gate_proj.weight': \(128, 64\) vs \(96, 64\)"):
        plan_trace(TraceSpec(base=olmo2, candidate=ModelSpec(model=str(narrow)), lake=lake))
    gpt2 = tmp_path / "gpt2"  # an architecture whose permutations tracing does not know: refused from its config
    AutoModelForCausalLM.from_config(tiny_config("gpt2", tokenizer)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(TracingError, match="the base .* is a GPT2LMHeadModel; tracing knows OlmoForCausalLM, Olmo2ForCausalLM only"):
        plan_trace(TraceSpec(base=ModelSpec(model=str(gpt2)), candidate=ModelSpec(model=str(gpt2)), lake=lake))
    with pytest.raises(LakeError, match="nothere"):
        plan_trace(TraceSpec(base=olmo2, candidate=olmo2, dataset="nothere", lake=lake))
    for bad, match in (({"statistics": ["cka"]}, "statistics"), ({"points": 1}, "points"),
                       ({"permutations": 0}, "permutations")):
        with pytest.raises(ValidationError, match=match):
            TraceSpec(base=olmo2, candidate=olmo2, lake=lake, **bad)
    assert not (tmp_path / "lake" / "tracing").exists()


def _unit(x):
    x = x.detach().double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _matching(w_b, w_c):
    """For each base row, the candidate row of a maximum-cosine perfect matching (scipy on numpy cosines)."""
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(_unit(w_b) @ _unit(w_c).T, maximize=True)
    return c[np.argsort(r)]


def test_matching_test_against_scipy_written_out(family):
    """Per layer: Hungarian matchings from gate rows and from up rows (scipy on numpy cosines), the units they agree
    on, the permutation p-value from the same draws, Fisher's combination (scipy.stats.chi2)."""
    from scipy.stats import chi2

    base, other = family["olmo"]["base"], family["olmo"]["independent"]
    got = matching_test(base, other, 49, seed=4)
    hidden = _matching(base.get_input_embeddings().weight.T, other.get_input_embeddings().weight.T)
    rng = np.random.default_rng(4)
    ps = []
    for index, (lb, lc) in enumerate(zip(base.model.layers, other.model.layers)):
        gate, up = (_matching(getattr(lb.mlp, n).weight, getattr(lc.mlp, n).weight[:, hidden]) for n in ("gate_proj", "up_proj"))
        observed = sum(int(g == u) for g, u in zip(gate, up))
        assert got["agreements"][index] == observed and got["units"] == len(gate) == 128
        null = []
        for _ in range(49):
            shuffle = rng.permutation(len(up))
            null.append(sum(int(gate[i] == up[shuffle[i]]) for i in range(len(up))))
        assert got["null"][index] == null
        p = (1 + sum(n >= observed for n in null)) / 50
        assert math.isclose(got["p_layers"][index], p)
        ps.append(p)
    assert math.isclose(got["p_value"], chi2.sf(-2 * sum(math.log(p) for p in ps), 2 * len(ps)), rel_tol=1e-12)


def _noisy_copy(model, scale, seed=0):
    """The model with Gaussian noise of `scale` times each weight matrix's spread added: distantly derived."""
    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=generator))
    return noisy


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
def test_matching_test_is_the_same_whatever_the_candidate_calls_its_units(family, arch):
    """Relabelling the candidate's MLP units and residual dimensions (the same function) changes neither the
    statistic nor the null's draws nor the p-value: for an independent model, and for a distant derivative whose
    matchings agree on some units only (where a statistic reading unit indices as numbers moved most)."""
    base = family[arch]["base"]
    for candidate in (family[arch]["independent"], _noisy_copy(base, 5.0)):
        want = matching_test(base, candidate, 99, seed=3)
        for seed in (1, 2):
            relabelled = permute_model(copy.deepcopy(candidate), random_permutation(candidate, seed))
            got = matching_test(base, relabelled, 99, seed=3)
            assert got["p_layers"] == want["p_layers"] and got["p_value"] == want["p_value"], (arch, seed, got, want)
            assert got["agreements"] == want["agreements"] and got["null"] == want["null"]
    assert 0 < sum(want["agreements"]) < want["units"] * len(want["agreements"]), "the noisy copy agrees on some units"


def test_matching_null_is_the_candidate_with_its_up_units_shuffled(family):
    """Each null draw equals the slow obvious version: the candidate's up-projection rows shuffled against its gate
    rows and matched to the base again (Hungarian); and the null's law is that of the fixed points of a random
    permutation (mean 1, a share 1/e of zeros), whatever the models."""
    from gradlake.tasks.tracing.statistics import null_agreements, unit_matchings

    base = family["olmo2"]["base"]
    candidate = _noisy_copy(base, 4.0)
    got = matching_test(base, candidate, 5, seed=9)
    hidden = _matching(base.get_input_embeddings().weight.T, candidate.get_input_embeddings().weight.T)
    rng = np.random.default_rng(9)
    lb, lc = base.model.layers[0], candidate.model.layers[0]
    gate = _matching(lb.mlp.gate_proj.weight, lc.mlp.gate_proj.weight[:, hidden])
    up = _matching(lb.mlp.up_proj.weight, lc.mlp.up_proj.weight[:, hidden])
    for draw in range(5):
        shuffle = rng.permutation(len(up))  # in the base's order: the candidate's own shuffle of its up rows is s
        s = np.argsort(up[shuffle][np.argsort(up)])
        shuffled_up = _matching(lb.mlp.up_proj.weight, lc.mlp.up_proj.weight[s][:, hidden])
        assert np.array_equal(shuffled_up, up[shuffle])
        assert got["null"][0][draw] == int((gate == shuffled_up).sum())
    (gate, up), _ = unit_matchings(base, candidate)
    null = np.array(null_agreements(gate, up, 4000, np.random.default_rng(0)))
    assert abs(null.mean() - 1) < 0.1 and abs((null == 0).mean() - math.exp(-1)) < 0.03, (null.mean(), (null == 0).mean())


def test_permuted_control_is_a_result_of_its_own_and_says_so(family, tmp_path):
    """The control (candidate permuted first) lands beside the real result, not over it; the real result keeps its
    path; the reports (Markdown and HTML), the verdict and the summary table name the control and its seed."""
    import html
    import json

    from conftest import write_probe
    from gradlake.lake import layout
    from gradlake.tasks.common.lineage import lake_keys
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.tracing.trace import TraceSpec, run_trace, summary_table, write_summary

    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    dirs = family["olmo2"]["dirs"]
    base = ModelSpec(model=str(dirs["base"]), checkpoint="checkpoint-1")
    candidate = ModelSpec(model=str(dirs["fine_tune"]), checkpoint="checkpoint-2")
    common = dict(base=base, candidate=candidate, statistics=["cos"], n_samples=4, max_length=128, permutations=99,
                  lake=lake)
    log = lambda *_: None  # noqa: E731
    real = run_trace(TraceSpec(**common), log)
    control = run_trace(TraceSpec(permute=True, permute_seed=5, **common), log)
    (b, bc), (c, cc) = lake_keys(base), lake_keys(candidate)
    assert real == f"tracing/{b}/{bc}/{c}/{cc}" == layout.tracing_dir(b, bc, c, cc), "an unpermuted path never moves"
    assert control == f"{real}-permuted-s5"
    store = LakeStore(lake)
    meta = {d: json.loads(store.fs.cat_file(store.path(f"{d}/meta.json"))) for d in (real, control)}
    assert meta[real]["lineage"]["permute_seed"] is None and meta[control]["lineage"]["permute_seed"] == 5
    assert "control" not in meta[real]["verdict"]
    assert meta[control]["verdict"].endswith("control: candidate permuted with seed 5")
    report = {d: store.fs.cat_file(store.path(f"{d}/report.md")).decode() for d in (real, control)}
    assert "control: candidate permuted with seed 5" in report[control] and "permuted with seed" not in report[real]
    # the HTML page: the verdict, its p-value's reach, the control flag, the per-layer plot inlined, the lineage
    pages = {d: store.fs.cat_file(store.path(f"{d}/report.html")).decode() for d in (real, control)}
    for d in (real, control):
        assert f"<b>Verdict:</b> {html.escape(meta[d]['verdict'])}</p>" in pages[d]
        assert "<b>permutations</b>: 99</li>" in pages[d] and "<b>smallest reachable p</b>: 0.001</li>" in pages[d]
        assert pages[d].count("data:image/png;base64,") == 1 and "<b>gradlake_version</b>" in pages[d]
    assert "<b>candidate permuted first (control)</b>: yes, seed 5</li>" in pages[control]
    assert "<b>candidate permuted first (control)</b>: no</li>" in pages[real] and "This is a control" not in pages[real]
    # relabelling the candidate's units (the control) changes neither the matching test's statistic nor its p-value
    assert meta[control]["summary"]["p_value"] == meta[real]["summary"]["p_value"]
    assert meta[control]["summary"]["matching_agreements"] == meta[real]["summary"]["matching_agreements"]
    table = summary_table(store, base).set_index("path")
    assert sorted(table.index) == sorted([real, control])
    assert table.loc[real, "control"] == False and table.loc[control, "control"] == True  # noqa: E712
    assert pd.isna(table.loc[real, "permuted_seed"]) and table.loc[control, "permuted_seed"] == 5
    directory = write_summary(store, base)
    text = store.fs.cat_file(store.path(f"{directory}/summary.md")).decode()
    assert "permuted_seed" in text and "control" in text
    page = store.fs.cat_file(store.path(f"{directory}/summary.html")).decode()
    assert "<th>control</th>" in page and "<td>True</td><td>5</td><td>derived</td>" in page


def test_too_few_permutations_are_refused_at_plan_time_and_never_read_as_no_evidence(family, tiny_models, tmp_path):
    """n permutations give p >= 1/(n+1) (unaligned) or Fisher's combination of that over the layers (the matching
    test, aligned): a count whose smallest p is not below 0.01 is refused, naming the count that would do."""
    from scipy.stats import chi2

    from conftest import write_probe
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.tracing.trace import TraceSpec, plan_trace, trace_pair, verdict

    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    base = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    candidate = ModelSpec(model=str(family["olmo2"]["dirs"]["fine_tune"]), checkpoint="checkpoint-2")
    common = dict(base=base, candidate=candidate, lake=lake)
    with pytest.raises(TracingError, match=r"permutations 20 cannot give p < 0.01: the smallest p-value of the "
                                           r"permutation test with 20 permutations is 0.048; use at least 100$"):
        plan_trace(TraceSpec(align=False, permutations=20, **common))
    with pytest.raises(TracingError, match=r"permutations 99 cannot give p < 0.01: .* is 0.01; use at least 100$"):
        plan_trace(TraceSpec(align=False, permutations=99, **common))
    fewest = min(n for n in range(1, 100) if chi2.sf(4 * math.log(n + 1), 4) < 0.01)  # 2 layers
    with pytest.raises(TracingError, match=rf"permutations 20 cannot give p < 0.01: the smallest p-value of the "
                                           rf"matching test \(Fisher's method over 2 layers\) with 20 permutations is "
                                           rf"0.016; use at least {fewest}$"):
        plan_trace(TraceSpec(permutations=20, **common))
    plan_trace(TraceSpec(permutations=fewest, **common))
    plan_trace(TraceSpec(align=False, permutations=100, **common))
    plan_trace(TraceSpec(statistics=["mode"], permutations=1, **common))  # no p-value decides: nothing to reach
    # past the plan (trace_pair alone), a real derivative with too few permutations reads undecided, not "no evidence"
    spec = TraceSpec(align=False, statistics=["cos"], permutations=20, n_samples=4, max_length=128, **common)
    _, summary = trace_pair(spec, log=lambda *_: None)
    assert summary["p_value"] == 1 / 21 and not summary["derived"]
    assert verdict(summary).startswith("undecided (20 permutations cannot reach p < 0.01"), verdict(summary)
    from gradlake.tasks.tracing.statistics import smallest_p_value

    assert smallest_p_value(20) == 1 / 21 and smallest_p_value(99) == 1 / 100 and smallest_p_value(100) < 0.01
    assert math.isclose(smallest_p_value(20, 2), chi2.sf(4 * math.log(21), 4), rel_tol=1e-12)


def test_trace_command_prints_the_control_it_ran_not_the_real_result_beside_it(family, tmp_path):
    """`gradlake trace --permute` after the real result exists: the table printed is the control's own."""
    from typer.testing import CliRunner

    from conftest import write_probe
    from gradlake.flows.cli import app
    from gradlake.lake.results import read_result_table
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.tracing.trace import TraceSpec, run_trace

    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    dirs = family["olmo2"]["dirs"]
    base = ModelSpec(model=str(dirs["base"]), checkpoint="checkpoint-1")
    candidate = ModelSpec(model=str(dirs["fine_tune"]), checkpoint="checkpoint-2")
    real = run_trace(TraceSpec(base=base, candidate=candidate, statistics=["cos"], n_samples=4, max_length=128,
                               permutations=99, lake=lake), lambda *_: None)
    result = CliRunner().invoke(app, ["trace", "--base", base.model, "--base-checkpoint", "checkpoint-1",
                                      "--candidate", candidate.model, "--candidate-checkpoint", "checkpoint-2",
                                      "--statistics", "cos", "--samples", "4", "--max-length", "128",
                                      "--permutations", "99", "--permute", "--permute-seed", "5", "--lake", lake],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    control = f"{real}-permuted-s5"
    assert f"results: {lake}/{control} (report.html)" in result.output
    store = LakeStore(lake)
    shown, other = (read_result_table(store, d, "results") for d in (control, real))
    unaligned = lambda t: t[(t["statistic"] == "cos") & ~t["aligned"]]["value"].iloc[0]  # noqa: E731
    assert unaligned(shown) != pytest.approx(unaligned(other)), "the permutation moves the unaligned cosine"
    printed = lambda t: t.to_string(index=False, float_format="{:.4g}".format)  # noqa: E731
    assert printed(shown) in result.output and printed(other) not in result.output
