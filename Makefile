# Torch is installed first and pinned, so no dependency resolves it on its own (that pulls GBs of CUDA).
# install also creates .venv-conformance (optimum-neuron 0.4.5, the conformance judge; <1 s when already complete).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	PYTHON=$(PYTHON) bash tests/conformance/setup_env.sh

demo: install
	bash scripts/demo.sh

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) scripts/bench_export_memory.py
