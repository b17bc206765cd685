# The two commands of the README: `make demo` (main job) and `make test`. Both create the virtual
# environment and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install. Default: the release this project is tested with. For a specific CUDA
# (or CPU-only) build pass the pip arguments PyTorch's install selector gives, e.g.
#   make demo TORCH="torch==2.13.0 --index-url <PyTorch's CUDA 12.x wheel index>"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_collapse-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-collapse lacoot

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/depth_speedup.py | tee benchmarks/results/depth_speedup.txt
	$(BIN)/python benchmarks/bench_msw.py | tee benchmarks/results/bench_msw.txt
	$(BIN)/python benchmarks/bench_lacoot_overhead.py | tee benchmarks/results/bench_lacoot_overhead.txt
	$(BIN)/python benchmarks/bench_lacoot_quality.py | tee benchmarks/results/bench_lacoot_quality.txt
	$(BIN)/python benchmarks/bench_tlc.py | tee benchmarks/results/bench_tlc.txt
	$(BIN)/python benchmarks/bench_trady.py | tee benchmarks/results/bench_trady.txt

clean:
	rm -rf $(VENV) .pytest_cache
