"""Per-sample gradient extraction on a GPU at the real shapes, ready for one call of the device machine.

For AMD-OLMo-1B's and OLMo-2-7B's shapes (random weights from their configs, as
benchmarks/readme_shapes.py gives them; bfloat16; 512 random tokens per sample) it
measures tokens/s and the fraction of the bf16 peak (6 x matmul parameters x tokens
FLOPs over the rate of a large bf16 matrix product measured on the device, and over the
nominal peak of the named GPU) for: a plain training step (summed gradients, the scale),
extraction with on-the-fly kronecker 64x64, sparse flat 8192 and dense rademacher flat
8192 (TRAK's ``fast_jl`` kernel through ``CudaProjector``) projections of every 2-D
weight, no gradient kept, and Bergson's double-sided 64x64 projection where it installs.
Each case is estimated before it runs (probe timings of the projectors, the training
step's time, the memory its scratch needs) and skipped with the reason when it would not
fit the device or the time left; the sparse and dense kinds fall back to the MLP
down_proj weights first.  One JSON (docs/gpu-benchmark.md gives its format) and a table.

The device machine cannot reach the internet: ``--prepare`` (``make bench-gpu`` runs it)
puts what must travel in build/gpu-wheels: wheels for CPython 3.12 of what the device's
image lacks (pydantic, traker, Bergson and the packages it imports) and the ``fast_jl``
sdist, which ``--wheels`` then installs and builds there against the image's CUDA torch
for the device's own architecture.  Without CUDA it runs a reduced form (tiny OLMo and
OLMo-2, 32 tokens, float32) so that it cannot rot; the test suite runs that form.

    python benchmarks/gpu.py --prepare                  # here: fill build/gpu-wheels
    python benchmarks/gpu.py                            # here: the reduced CPU form
    python3 benchmarks/gpu.py --wheels build/gpu-wheels --out gpu.json   # on the GPU machine
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from readme_shapes import SHAPES as REAL_SHAPES  # benchmarks/readme_shapes.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = ROOT / "build" / "gpu-wheels"
SITE = Path(tempfile.gettempdir()) / "gradlake-gpu-site"
# traker's CUDA kernel (pyproject's `cuda` extra pins 0.1.3), an sdist only; its setup.py forces compute 7.0,
# which CUDA 13 no longer builds, so it is built here with torch's loader for the device's own architecture.
FAST_JL = ("https://files.pythonhosted.org/packages/b3/89/c3251ac89c2d79dbb5bbc64817d6d9349feddfbc4f2d78147f823f9881bc/"
           "fast_jl-0.1.3.tar.gz", "216100e9778da38b906a3c2a18b7c9e93bc395576e6943c7f920c98cce179775")
# What the device image lacks (/work/.library/device/KINDS.md lists what it holds), pinned as constraints.txt pins them.
CARRIED = ["pydantic==2.14.3", "pydantic_core==2.50.4", "annotated-types==0.8.0", "typing-inspection==0.4.5",
           "typing_extensions==4.16.0", "bergson==2.5.1", "petname==2.9", "simple-parsing==0.1.9",
           "docstring_parser==0.18.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
TRAKER = "traker==0.3.2"  # an sdist only: built into a wheel here (pure Python)
# Nominal dense bf16 rates (datasheets, no sparsity), by a fragment of torch's device name; first match wins.
NOMINAL_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512)
SHAPES = {**REAL_SHAPES, "tiny-olmo": ("olmo", dict(vocab_size=512, **TINY)),
          "tiny-olmo2": ("olmo2", dict(vocab_size=512, **TINY))}
BATCH = {"amd-olmo-1b": 8, "olmo-2-7b": 4}  # 7B: weights 14 GB, activations ~4 GB per 512-token sample, scratch
METHODS = "train_step,kronecker:64x64,sparse:flat:8192,rademacher:flat:8192,bergson:64"
REDUCED_METHODS = "train_step,kronecker:8x8,sparse:flat:512,rademacher:flat:512,bergson:8"
DOWN_PROJ = ".mlp.down_proj.weight"


def prepare(wheels: Path) -> None:
    """Download here what the device needs and cannot fetch: wheels for CPython 3.12 and the fast_jl sdist."""
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(wheels), *CARRIED], check=True)
    if not list(wheels.glob("traker-*.whl")):
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), TRAKER], check=True)
    sdist = wheels / FAST_JL[0].rsplit("/", 1)[1]
    if not sdist.exists():
        data = urllib.request.urlopen(FAST_JL[0], timeout=60).read()
        if hashlib.sha256(data).hexdigest() != FAST_JL[1]:
            raise SystemExit(f"{FAST_JL[0]} does not have the sha256 pinned in benchmarks/gpu.py ({FAST_JL[1]})")
        sdist.write_bytes(data)
    size = sum(f.stat().st_size for f in wheels.iterdir()) / 2**20
    print(f"{wheels}: {len(list(wheels.iterdir()))} files, {size:.1f} MiB, to carry to the device machine")


def install_carried(wheels: Path) -> str:
    """Install the carried wheels into a scratch site and make `gradlake` importable from this checkout."""
    whls = sorted(str(w) for w in wheels.glob("*.whl"))
    if not whls:
        raise SystemExit(f"no wheels in {wheels}: run `make bench-gpu` (or `python benchmarks/gpu.py --prepare`) "
                         "where pip reaches PyPI, and carry that folder")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(SITE), *whls], check=True)
    if importlib.util.find_spec("gradlake") is None:  # pyproject maps flows/, tasks/, lake/ to gradlake.*
        for sub in ("flows", "tasks", "lake"):
            link = SITE / "gradlake" / sub
            link.parent.mkdir(exist_ok=True)
            if not link.exists():
                link.symlink_to(ROOT / sub)
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    return f"{len(whls)} wheels installed into {SITE}"


def build_fast_jl(wheels: Path | None) -> str:
    """Import fast_jl, or build it from the carried sdist for this GPU; says what happened."""
    import torch

    try:
        import fast_jl  # noqa: F401
        return "installed"
    except ImportError:
        pass
    sdist = next(iter(sorted((wheels or WHEELS).glob("fast_jl-*.tar.gz"))), None)
    if sdist is None:
        return f"absent: no fast_jl sdist in {wheels or WHEELS} (run --prepare here and carry it)"
    from torch.utils.cpp_extension import load

    src = Path(tempfile.mkdtemp(prefix="fast_jl-"))
    with tarfile.open(sdist) as tar:
        tar.extractall(src, filter="data")
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    start = time.perf_counter()
    try:
        module = load("fast_jl", [str(next(src.glob("*/fast_jl.cu")))], extra_cuda_cflags=["-O3"],
                      build_directory=str(src), verbose=False)
    except Exception as exc:  # a compiler error is a result to report, not a crash of the benchmark
        return f"build failed: {str(exc)[-1500:]}"
    sys.modules["fast_jl"] = module  # what `import fast_jl` in traker finds
    return f"built for sm_{major}{minor} in {time.perf_counter() - start:.0f} s"


def nominal_peak(name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of the named GPU, or None when it is not in NOMINAL_BF16."""
    return next((rate for key, rate in NOMINAL_BF16 if key in name), None)


def build_model(shape: str, device, dtype):
    """A random-weight model of the shape, made directly on the device (no host copy of 7B weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, sizes = SHAPES[shape]
    config = AutoConfig.for_model(arch, **sizes, tie_word_embeddings=False, pad_token_id=1, bos_token_id=None,
                                  eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


class Probes:
    """Per-coordinate costs of the projectors on this device, measured once each (for the plan-time estimates)."""

    def __init__(self, device, batch: int):
        self.device, self.batch, self.costs = device, batch, {}

    def seconds(self, kind: str, k: int, n: int) -> tuple[float, float, float]:
        """Seconds per coordinate: (a call, building the cache, a call redrawing) for kind 'sparse' or 'rademacher'."""
        if (kind, k) not in self.costs:
            import torch
            from extraction import timed_call

            from gradlake.tasks.projection.projectors import TILE_ROWS, SparseProjector, make_projector

            n = 4 * TILE_ROWS if kind == "sparse" else min(n, 4 * TILE_ROWS)  # a dense probe's matrix may be cached
            grads = torch.randn(self.batch, n, device=self.device)

            def per_call(projector) -> float:
                timed_call(lambda: projector.project(grads), self.device)  # warm-up
                return timed_call(lambda: projector.project(grads), self.device)[1] / n

            if kind == "sparse":
                start = time.perf_counter()
                cached = SparseProjector(n, k, 0, "probe", self.device)
                build = (time.perf_counter() - start) / n
                redraw = per_call(SparseProjector(n, k, 0, "probe", self.device, memory_budget=0))
                self.costs[kind, k] = (per_call(cached), build, redraw)
            else:
                self.costs[kind, k] = (per_call(make_projector(n, k, kind, 0, "probe", self.device)), 0.0, 0.0)
        return self.costs[kind, k]


def estimate(method: str, numels: list[int], step_s: float, probes: Probes) -> float:
    """Seconds for building a method's projectors and 2 calls (a warm-up and one timed), before anything is built."""
    from gradlake.tasks.projection.projectors import SPARSE_BYTES_PER_COORDINATE, SPARSE_CACHE_BUDGET

    kind, total = method.split(":")[0], sum(numels)
    base = 2 * 1.5 * step_s  # extraction's forward and backward, about a training step's and a half
    if kind not in ("sparse", "rademacher"):
        return base
    per_call, build, redraw = probes.seconds(kind, int(method.split(":")[2]), max(numels))
    cached = min(total, SPARSE_CACHE_BUDGET // SPARSE_BYTES_PER_COORDINATE) if kind == "sparse" else 0
    return base + cached * build + 2 * (cached * per_call + (total - cached) * (redraw or per_call))


def plan(model, method: str, batch: int, reduced: bool, step_s: float, probes: Probes, left: float) -> dict:
    """The first tensor set the method can project within the device's memory and the time left, or why none."""
    import torch

    params = dict(model.named_parameters())
    weights = [n for n, p in params.items() if p.dim() == 2]
    choices = [("every 2-D weight", weights)]
    dense = method.split(":")[0] in ("sparse", "rademacher")
    if dense and not reduced:  # fallbacks: the down_proj weights, as many as the sparse cache holds, one
        from gradlake.tasks.projection.projectors import SPARSE_BYTES_PER_COORDINATE, SPARSE_CACHE_BUDGET

        down = [n for n in weights if n.endswith(DOWN_PROJ)]
        fit = max(2, SPARSE_CACHE_BUDGET // SPARSE_BYTES_PER_COORDINATE // params[down[0]].numel())
        choices += [("mlp down_proj weights", down), (f"the first {fit} layers' mlp down_proj", down[:fit]),
                    ("layer 0's mlp down_proj", down[:1])]
    device = next(model.parameters()).device
    for label, names in choices:
        numels = [params[n].numel() for n in names]
        # the largest tensor's per-sample gradients, formed in the model's dtype and projected in float32
        need = batch * max(numels) * (model.dtype.itemsize + 4) if dense else 0
        # what the device has free, and what torch's allocator holds unused (it serves that first)
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated() \
            if device.type == "cuda" else math.inf
        case = dict(selection=label, names=names, tensors=len(names), projected_params=sum(numels), reason=None)
        if need > free:
            case["reason"] = f"{label}: the scratch of the largest gradient needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
            continue
        guess = estimate(method, numels, step_s, probes)
        case["estimate_s"] = float(f"{guess:.3g}")  # tiny cases take milliseconds
        if guess > left:
            case["reason"] = f"{label}: estimated {guess:.1f} s (projector build and 2 calls) > {left:.1f} s left"
            continue
        return case
    return case


def extractor_call(model, method: str, names: list[str], ids):
    """gradlake's engine projecting on the fly with no gradient kept: (one call, the projectors' names)."""
    from extraction import on_the_fly

    from gradlake.tasks.projection.spec import parse_projection

    extractor = on_the_fly(model, names, parse_projection(method))

    def call():
        with extractor:
            extractor(ids, ids)
    return call, ", ".join(sorted({p.name for p in extractor.projections[0].projectors.values()}))


def bergson_call(model, ids, projection_dim: int):
    """One call of Bergson's in-memory collection of the batch (its double-sided projection), as `bergson build` runs it."""
    import logging

    from datasets import Dataset

    from bergson import GradientProcessor, IndexConfig, InMemoryCollector
    from bergson.collector.collector import CollectorComputer

    rows = ids.tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows, "length": [len(r) for r in rows]})
    cfg = IndexConfig(tempfile.mkdtemp(prefix="bergson-"), loss_reduction="mean", projection_dim=projection_dim)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    processor = GradientProcessor(projection_dim=projection_dim, include_bias=cfg.include_bias)
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)  # Bergson's setup: the graph starts at the embeddings
    collector = InMemoryCollector(model=model, data=data, cfg=cfg, processor=processor)
    logging.disable(logging.INFO)
    try:
        computer = CollectorComputer(model, data, collector=collector, batches=[list(range(len(rows)))], cfg=cfg)
    finally:
        logging.disable(logging.NOTSET)
    computer.logger.setLevel(logging.WARNING)
    return computer.run_with_collector_hooks, len(collector.target_info)


def run_case(model, shape: str, method: str, ids, args, probes: Probes, step_s: float | None, deadline: float) -> dict:
    """Time one method on one shape (a warm-up call, then up to `rounds` calls), or say why it was skipped."""
    import torch
    from extraction import peak_rss_gib, reset_peak_rss, timed_call

    from gradlake.tasks.common.loss import sample_losses

    batch, tokens = ids.shape
    device = ids.device
    case = dict(shape=shape, method=method, batch=batch, tokens=tokens, status="skipped", reason=None, selection=None,
                tensors=None, projected_params=None, projector=None, estimate_s=None)
    kind = method.split(":")[0]
    if kind == "bergson" and importlib.util.find_spec("bergson") is None:
        return {**case, "reason": "Bergson is not installed (make bench-peers here; carried wheels on the device)"}
    if kind == "rademacher" and device.type == "cuda" and "fast_jl" not in sys.modules:
        return {**case, "reason": "fast_jl is not built (see setup.fast_jl): the dense kind would redraw its matrix"}
    if kind not in ("train_step", "bergson"):
        planned = plan(model, method, batch, args.reduced, step_s or 0.0, probes,
                       min(args.case_s, deadline - time.perf_counter()))
        names = planned.pop("names")
        case.update(planned)
        if case["reason"]:
            return case
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    try:
        start = time.perf_counter()
        if kind == "train_step":
            def call():
                model.requires_grad_(True)
                model.zero_grad(set_to_none=False)
                sample_losses(model(input_ids=ids).logits, ids).sum().backward()
            case.update(selection="summed gradients of every parameter", projector="none")
        elif kind == "bergson":
            call, tensors = bergson_call(model, ids, int(method.split(":")[1]))
            case.update(selection="nn.Linear weights", projector="bergson double-sided", tensors=tensors,
                        projected_params=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)))
        else:
            call, case["projector"] = extractor_call(model, method, names, ids)
        build_s = time.perf_counter() - start
        first = timed_call(call, device)[1]
        walls, stop = [], min(deadline, start + args.case_s)  # one timed call at least, more while time is left
        while len(walls) < args.rounds and (not walls or time.perf_counter() + first < stop):
            walls.append(timed_call(call, device)[1])
    except torch.cuda.OutOfMemoryError as exc:
        return {**case, "reason": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    except Exception as exc:  # one case's failure (a peer's import, a kernel) must not lose the others' results
        return {**case, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[-400:]}"}
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
    rates = [batch * tokens / w for w in walls]
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    return {**case, "status": "ran", "build_s": round(build_s, 3), "first_call_s": round(first, 4),
            "calls_s": [round(w, 4) for w in walls], "tokens_per_s": statistics.median(rates),
            "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates), "peak_memory_gib": round(memory, 2)}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (the full form on CUDA, the reduced one elsewhere); write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="download what the device needs into --wheels and stop")
    parser.add_argument("--wheels", type=Path, default=None, help="carried wheels and fast_jl sdist to install first")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-bench.json")
    parser.add_argument("--reduced", action="store_true", help="the small CPU form's shapes (default without CUDA)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--shapes", default=None, help="comma-separated, of " + ", ".join(SHAPES))
    parser.add_argument("--methods", default=None, help=f"comma-separated (default {METHODS}; reduced {REDUCED_METHODS})")
    parser.add_argument("--tokens", type=int, default=None, help="per sample (512; reduced 32)")
    parser.add_argument("--batch", type=int, default=None, help="samples per call (amd-olmo-1b 8, olmo-2-7b 4; reduced 2)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per case after a warm-up call")
    parser.add_argument("--budget-s", type=float, default=420, help="seconds for the whole run, set-up included")
    parser.add_argument("--case-s", type=float, default=75, help="seconds a case may be estimated to take")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    os.environ.setdefault("TQDM_DISABLE", "1")  # Bergson's progress bar, once per call (read when tqdm is imported)
    if args.prepare:
        prepare(args.wheels or WHEELS)
        return {}
    setup = {"wheels": install_carried(args.wheels) if args.wheels else None}
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.version.cuda is None:
        raise SystemExit(f"torch {torch.__version__} is a CPU build: run with a CUDA build of torch (the device "
                         "image's python3 has one; it is too large to carry)")
    args.reduced = args.reduced or device.type != "cuda"
    dtype = torch.float32 if args.reduced else torch.bfloat16
    shapes = (args.shapes or ("tiny-olmo,tiny-olmo2" if args.reduced else "amd-olmo-1b,olmo-2-7b")).split(",")
    tokens = args.tokens or (32 if args.reduced else 512)
    methods = (args.methods or (REDUCED_METHODS if args.reduced else METHODS)).split(",")
    setup["fast_jl"] = build_fast_jl(args.wheels) if device.type == "cuda" else "not used on the CPU"
    print(f"setup: {setup}", flush=True)
    from extraction import matmul_rate

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    side = 256 if args.reduced else 8192
    measured = statistics.median(matmul_rate(device, dtype, side) for _ in range(3))
    nominal = nominal_peak(name) if device.type == "cuda" else None
    result = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:] if argv is None else argv,
              "device": {"type": device.type, "name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                         "python": platform.python_version(), "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if device.type == "cuda" else None},
              "setup": setup, "settings": {"tokens": tokens, "dtype": str(dtype).split(".")[1], "rounds": args.rounds,
                                           "budget_s": args.budget_s, "case_s": args.case_s, "reduced": args.reduced},
              "peak": {"dtype": str(dtype).split(".")[1], "matmul_side": side, "measured_flops": measured,
                       "nominal_flops": nominal, "measured_over_nominal": measured / nominal if nominal else None},
              "cases": []}
    deadline = began + args.budget_s
    for shape in shapes:
        batch = args.batch or (2 if args.reduced else BATCH.get(shape, 4))
        model = build_model(shape, device, dtype)
        ids = torch.randint(3, model.config.vocab_size, (batch, tokens), device=device,
                            generator=torch.Generator(device).manual_seed(0))
        # FLOPs per token: 6 x the parameters that multiply (the input embedding is a lookup)
        flops = 6 * (sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel())
        probes, step_s, step_rate = Probes(device, batch), None, None
        for method in methods:
            case = run_case(model, shape, method, ids, args, probes, step_s, deadline)
            case["params"] = sum(p.numel() for p in model.parameters())
            if case["status"] == "ran":
                case.update(flops_per_token=flops, fraction_of_peak=case["tokens_per_s"] * flops / measured,
                            fraction_of_nominal=case["tokens_per_s"] * flops / nominal if nominal else None)
                if method == "train_step":
                    step_s = statistics.median(case["calls_s"])
                    step_rate = case["tokens_per_s"]
                case["x_train_step"] = case["tokens_per_s"] / step_rate if step_rate else None
            result["cases"].append(case)
            write(result, args.out, began)  # after every case: a run stopped at its time limit keeps what it measured
            print(f"  {shape} {method}: {case['status']} {case.get('tokens_per_s') or case['reason']}", flush=True)
        del model, probes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(result, args.out, began)
    print_table(result)
    print(f"JSON: {args.out}")
    return result


def write(result: dict, out: Path, began: float) -> None:
    """The JSON as it stands, with the seconds since the start."""
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def print_table(result: dict) -> None:
    """The cases as a table: tokens/s (median, min-max), fraction of the measured and nominal peak, memory."""
    peak, dev = result["peak"], result["device"]
    nominal = f", nominal {peak['nominal_flops'] / 1e12:.0f}" if peak["nominal_flops"] else ""
    print(f"\n{dev['name']} ({dev['type']}, torch {dev['torch']}, CUDA {dev['cuda']}); {peak['dtype']} matmul "
          f"{peak['matmul_side']}^3: {peak['measured_flops'] / 1e12:.3g} TFLOP/s measured{nominal}; "
          f"{result['settings']['tokens']} tokens per sample; fast_jl: {result['setup']['fast_jl'][:80]}")
    print(f"{'shape':12s} {'method':22s} {'tensors':>7s} {'tokens/s':>10s} {'min-max':>17s} {'x peak':>7s} "
          f"{'x nominal':>9s} {'x step':>7s} {'GiB':>6s}")
    for c in result["cases"]:
        if c["status"] != "ran":
            print(f"{c['shape']:12s} {c['method']:22s} {c['status']}: {c['reason']}")
            continue
        nom = f"{c['fraction_of_nominal']:.3f}" if c["fraction_of_nominal"] else "-"
        step = f"{c['x_train_step']:.2f}" if c["x_train_step"] else "-"
        print(f"{c['shape']:12s} {c['method']:22s} {c['tensors'] or '':>7} {c['tokens_per_s']:10.0f} "
              f"{c['tokens_per_s_min']:8.0f}-{c['tokens_per_s_max']:<8.0f} {c['fraction_of_peak']:7.3f} {nom:>9s} "
              f"{step:>7s} {c['peak_memory_gib']:6.1f}")


if __name__ == "__main__":
    main()
