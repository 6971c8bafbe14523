# install keeps an installed torch and never touches a Neuron SDK's packages (scripts/install.py); only where no
# torch is installed does it install the CPU build 2.13.0, first and pinned (resolved on its own: GBs of CUDA).
# test also makes the suite's two side environments (each idempotent: a stamp, <1 s when complete):
#   .venv-conformance  optimum-neuron 0.4.5, the conformance judge (tests/conformance/setup_env.sh)
#   .venv-pinned       our package on optimum-neuron 0.4.5's pinned stack, the suite's second run (tests/pinned/setup_env.sh)
PYTHON ?= python3
# The second stack runs everything that depends on the stack: not the Ray cluster, install, README, hostile-input
# and remote-trust tests (our own code paths, the same on both stacks), so CI stays well inside its time.
PINNED_TESTS ?= --ignore=tests/test_ray_executor.py --ignore=tests/test_neuron_host.py --ignore=tests/test_readme.py \
                --ignore=tests/test_hostile_inputs.py --ignore=tests/test_trust.py \
                --ignore=tests/test_import_contracts.py

# quality: the checks CI runs before the tests (seconds; after make install); format: what makes the first two pass
LINT_IMPORTS = $(PYTHON) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'

.PHONY: install envs demo quality format test test-fast test-latest test-pinned suite-latest suite-pinned bench

install:
	$(PYTHON) scripts/install.py

envs:
	PYTHON=$(PYTHON) bash tests/conformance/setup_env.sh
	PYTHON=$(PYTHON) bash tests/pinned/setup_env.sh

demo: install
	bash scripts/demo.sh

quality:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(LINT_IMPORTS)

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# test runs the two stacks at once, one core each (most of a test is a process starting Python and torch, on one
# core), each stack's output printed whole when it ends; test-latest and test-pinned run one stack
test: install envs
	$(MAKE) --no-print-directory -j2 --output-sync=target suite-latest suite-pinned OMP_THREADS=1

# the fast tier, for a developer between edits (no install; about 3 minutes): CI runs every tier
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

test-latest: install envs
	$(MAKE) --no-print-directory suite-latest

test-pinned: envs
	$(MAKE) --no-print-directory suite-pinned

# torch's threads per suite: all cores when one suite runs, one each when both do (more would only contend)
OMP_THREADS ?=
SUITE_ENV = $(if $(OMP_THREADS),OMP_NUM_THREADS=$(OMP_THREADS) MKL_NUM_THREADS=$(OMP_THREADS),)

suite-latest:
	$(SUITE_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider

suite-pinned:
	$(SUITE_ENV) .venv-pinned/bin/python -m pytest -q -p no:cacheprovider $(PINNED_TESTS)

bench: install
	$(PYTHON) scripts/bench_export_memory.py
