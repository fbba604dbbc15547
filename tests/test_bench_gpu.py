"""benchmarks/gpu.py in its reduced CPU form, so that the GPU run cannot rot: it runs, and its JSON has the format
docs/gpu-benchmark.md documents, with finite positive numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = {"schema", "created", "argv", "device", "setup", "settings", "peak", "cases", "elapsed_s"}
CASE = {"shape", "method", "batch", "tokens", "status", "reason", "selection", "tensors", "projected_params", "projector",
        "estimate_s", "params"}
RAN = {"build_s", "first_call_s", "calls_s", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "peak_memory_gib",
       "flops_per_token", "fraction_of_peak", "fraction_of_nominal", "x_train_step"}


def load_benchmark():
    """benchmarks/gpu.py as a module; its siblings (readme_shapes, extraction) found after everything else."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))  # appended: benchmarks/io.py must not shadow anything
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_reduced_form_writes_the_documented_json(tmp_path):
    gpu = load_benchmark()
    out = tmp_path / "gpu.json"
    returned = gpu.main(["--device", "cpu", "--shapes", "tiny-olmo2", "--rounds", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert set(result) == TOP and result["schema"] == 1
    assert result["device"]["type"] == "cpu" and result["settings"]["reduced"] is True
    assert positive(result["peak"]["measured_flops"]) and result["peak"]["nominal_flops"] is None
    assert result["setup"]["fast_jl"] == "not used on the CPU"
    cases = {c["method"]: c for c in result["cases"]}
    assert list(cases) == gpu.REDUCED_METHODS.split(",")
    for method, case in cases.items():
        assert CASE <= set(case), method
        if case["status"] == "skipped":  # only Bergson may be absent here; a skip always says why
            assert method.startswith("bergson") and case["reason"], case
            continue
        assert case["status"] == "ran" and case["reason"] is None
        assert RAN <= set(case), method
        for key in ("build_s", "first_call_s", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
                    "peak_memory_gib", "flops_per_token", "fraction_of_peak", "x_train_step", "params"):
            assert positive(case[key]) or (key == "build_s" and case[key] == 0), (method, key, case[key])
        assert len(case["calls_s"]) == 2 and all(positive(t) for t in case["calls_s"])
        assert case["tokens_per_s_min"] <= case["tokens_per_s"] <= case["tokens_per_s_max"]
        assert abs(case["batch"] * case["tokens"] / max(case["calls_s"]) / case["tokens_per_s_min"] - 1) < 1e-2
    documented = (ROOT / "docs" / "gpu-benchmark.md").read_text()
    keys = {*result, *(k for part in ("device", "setup", "settings", "peak") for k in result[part]),
            *(k for case in result["cases"] for k in case)}
    assert not [k for k in sorted(keys) if f"`{k}`" not in documented], "keys the JSON format section does not name"
    assert cases["train_step"]["x_train_step"] == 1
    for method in ("kronecker:8x8", "sparse:flat:512", "rademacher:flat:512"):
        assert cases[method]["status"] == "ran" and cases[method]["tensors"] == 16  # every 2-D weight of tiny OLMo-2
        assert cases[method]["projector"].startswith("gradlake.")


def test_a_case_over_the_time_left_is_skipped_with_its_estimate(tmp_path):
    gpu = load_benchmark()
    result = gpu.main(["--device", "cpu", "--shapes", "tiny-olmo", "--methods", "train_step,sparse:flat:512",
                       "--rounds", "1", "--case-s", "0", "--out", str(tmp_path / "gpu.json")])
    step, sparse = result["cases"]
    assert step["status"] == "ran"  # the scale is always measured
    assert sparse["status"] == "skipped" and "estimated" in sparse["reason"] and "> 0.0 s left" in sparse["reason"]
    assert positive(sparse["estimate_s"])
