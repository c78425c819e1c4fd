# sftflow: two commands on a fresh machine -> `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
LS_VENV := .venv-labelstudio
BIN := $(VENV)/bin
UV := $(BIN)/uv
# The lock pins torch's CPU build (2.13.0+cpu). On the project's machines that wheel lies on disk
# (TORCH_WHEELS); elsewhere it comes from the PyTorch CPU wheel index, which has no CUDA builds,
# so no resolver ever fetches CUDA wheels.
TORCH_WHEELS ?= /opt/wheels
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match)
PYTEST_ARGS ?=
# `make test` runs the suite on parallel workers (pytest-xdist; tests of one xdist_group share a
# worker); most of its time is spent waiting on services, so more workers than cores pay. (With
# bytecode compiled at install, 4 workers used 68 % of 2 cores; 6 were slower: 11 min 04 s of
# pytest against 10 min 04 s, 18 min 20 s of user CPU against 14 min 13 s, one more harness
# server per worker and more contention.)
# PYTEST_XDIST= (empty) runs it serially.
PYTEST_XDIST ?= -n 4 --dist loadgroup

.PHONY: install install-app install-labelstudio install-browser lock lint-imports test test-slow test-unit demo stack-up stack-down stack-status lint bench clean

# The three are independent: run side by side (downloads of one overlap the other's bytecode
# compilation and apt's unpacking), each one's output kept together.
install: $(UV)
	@$(MAKE) --no-print-directory -j3 -O install-app install-labelstudio install-browser

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.9

# Exactly the locked versions (uv pip sync removes anything else), then the project itself.
# Bytecode is compiled here, once: where PYTHONDONTWRITEBYTECODE is set (this project's machines
# and CI), Python otherwise compiles every module from source in every process it starts
# (`sftflow --help` took 1.2 s of CPU, 0.4 s with the bytecode; the suite starts hundreds).
# So are the dedup kernels (numba, cached beside tasks/dedup/kernel.py): ~10 s, once.
install-app: $(UV)
	$(UV) pip sync -q --compile-bytecode --python $(BIN)/python $(FIND_LINKS) requirements/lock.txt
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q -j 0 sftflow tasks flows infra deployments >/dev/null
	$(BIN)/python -c "from sftflow.tasks.dedup.minhash import compile_kernels; compile_kernels()"

# Label Studio's pins clash with the app's: it gets its own virtual environment.
install-labelstudio: $(UV)
	test -x $(LS_VENV)/bin/python || $(UV) venv -q -p $(PYTHON) $(LS_VENV)
	$(UV) pip sync -q --compile-bytecode --python $(LS_VENV)/bin/python requirements/labelstudio.lock.txt

# The editor tests' browser (tests/_browser.py): Debian's chromium and chromium-driver, installed
# when missing and this user may (root, or sudo without a password); otherwise it says how.
install-browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "install-browser: run 'sudo apt-get install chromium chromium-driver' (the editor tests need them)"; exit 0; fi; \
	($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver) >/dev/null \
	  || echo "install-browser: apt-get could not install chromium and chromium-driver"

# Re-pin after editing pyproject.toml dependencies.
lock: $(UV)
	$(UV) pip compile -q pyproject.toml --extra train --extra tracking --extra aws --extra dev -c requirements/constraints.txt $(FIND_LINKS) --python-version 3.11 -o requirements/lock.txt
	$(UV) pip compile -q requirements/labelstudio.in --python-version 3.11 -o requirements/labelstudio.lock.txt

# The test suite starts (or reuses) the local stack it needs and stops what it started.
# The import contracts (pyproject.toml) over the package as installed (see tests/import_view.py).
lint-imports: install-app
	$(BIN)/python tests/import_view.py

test: install
	$(BIN)/python tests/import_view.py
	$(BIN)/pytest $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS)

# Tests bound by a server's fixed timers (minutes each): the Prefect restart and lease tests.
test-slow: install
	$(BIN)/pytest $(PYTEST_XDIST) -m slow $(PYTEST_ARGS)

test-unit: install-app
	$(BIN)/pytest -m "not integration and not prefect and not train" $(PYTEST_ARGS)

demo: install
	$(BIN)/sftflow stack up
	$(BIN)/sftflow demo

stack-up: install
	$(BIN)/sftflow stack up
stack-down:
	$(BIN)/sftflow stack down
stack-status:
	$(BIN)/sftflow stack status

lint:
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/build.py
	$(BIN)/python bench/events.py

clean:
	-$(BIN)/sftflow stack down
	rm -rf .stack
