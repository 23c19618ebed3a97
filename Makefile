# ddt_fast developer entry points.
#   make demo      fresh machine -> venv, deps, extension, then `ddt-fast demo`: trains a digits DDT on
#                  the CPU, calibrates the DP schedule, compares schedules (demo_out/). The main job.
#   make test      fresh machine -> venv, deps, extension (CPU + CUDA when a toolkit
#                  exists), C++ tests (ctest), pytest. The one test command.
#   make test-fast the in-process unit tests (pytest -m "not slow"), under two minutes
#                  on 2 cores: the edit-test loop
#   make lint      ruff (lint + format check) and clang-format check; installs the
#                  pinned linters into the venv (no PyTorch needed)
#   make format    apply ruff format, ruff's import sorting and clang-format
#   make build     (re)build ddt_fast/_C*.so in place
#   make bench     CPU benchmarks, results under benchmarks/results/, tables in docs/benchmarks.md
#                  (GPU: benchmarks/gpu_suite.sh)
#   make clean
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch with CUDA 13 (matches the nvcc 13 toolkit); override to try others.
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy safetensors pytest hypothesis ninja cmake setuptools wheel huggingface_hub diffusers pillow tqdm matplotlib scikit-learn pyyaml
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Linters, pinned: another version formats differently.
LINT_DEPS := ruff==0.17.6 clang-format==23.1.5
PY_SOURCES := ddt_fast tests benchmarks setup.py
# C++ under the formatter. csrc/cuda/ and csrc/include/ (the GPU kernels and their
# headers) are left out: they are formatted when a GPU can re-verify them.
CXX_SOURCES = $(sort $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/torch/*.cpp csrc/torch/*.h tests/cpp/*.cpp))

.PHONY: demo test test-fast build venv lint-deps lint format cpp-test pytest bench clean

test: build cpp-test pytest

demo: build
	$(PY) -m ddt_fast demo $(DEMO_ARGS)

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)" $(DEPS)
	touch $@

venv: $(VENV)/.deps-stamp

$(VENV)/.lint-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(LINT_DEPS)
	touch $@

lint-deps: $(VENV)/.lint-stamp

build: venv
	MAX_JOBS=$(JOBS) $(PY) setup.py build_ext --inplace
	$(PY) -c "import ddt_fast, json; print(json.dumps(ddt_fast.info(), indent=1, default=str))"

cpp-test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build build/cmake -j $(JOBS)
	PATH="$(abspath $(VENV))/bin:$$PATH" ctest --test-dir build/cmake --output-on-failure

pytest: venv
	$(PY) -m pytest -q tests

# build recompiles only what changed (setup.py skips an up-to-date extension).
test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

lint: lint-deps
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: lint-deps
	$(VENV)/bin/ruff check --select I --fix $(PY_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

bench: build
	$(PY) benchmarks/bench_dp.py
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_sampling.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_training.py --precision bf16 --repeats 2  # the reference bf16 step takes minutes on a CPU without bf16 matrix instructions
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/summarize.py

clean:
	rm -rf build ddt_fast/_C*.so
