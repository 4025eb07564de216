# Single entry point. `make demo` runs the main job on embedded defaults (local SeaweedFS
# S3, local Prefect); `make test` installs the pinned set and runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo server test test-fast bench lock s3-start s3-stop clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-input -r requirements.lock
	$(BIN)/pip install --quiet --no-input --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/synthfactory demo

# Prefect server + UI on http://127.0.0.1:4200 with every recipe deployed from prefect.yaml,
# the embedded S3 and a worker; Ctrl-C stops them (options: make server ARGS="--port 4300").
server: $(STAMP)
	$(BIN)/synthfactory server $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

# The inner loop: every test that starts no server (S3, Prefect) and no end-to-end run.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/release_throughput.py
	$(BIN)/python bench/model_throughput.py
	$(BIN)/python bench/operations.py
	$(BIN)/python bench/loader_throughput.py
	$(BIN)/python bench/served_throughput.py
	$(BIN)/python bench/rollout_throughput.py
	$(BIN)/python bench/digits_utility.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/summary.py

s3-start: $(STAMP)
	$(BIN)/synthfactory s3 start

s3-stop: $(STAMP)
	$(BIN)/synthfactory s3 stop

# Re-resolve requirements.in into the full pinned set (needs the package index).
lock:
	rm -rf /tmp/synthfactory-lock && $(PYTHON) -m venv /tmp/synthfactory-lock
	/tmp/synthfactory-lock/bin/pip install --quiet -r requirements.in
	/tmp/synthfactory-lock/bin/pip freeze --exclude-editable | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

clean:
	rm -rf .data .pytest_cache
