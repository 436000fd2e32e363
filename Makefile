# Two commands for a fresh machine: `make run` and `make test`. Everything they need is installed here,
# from the package registries only (PyPI, npm, Maven Central, Debian for chromium).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA_LIB := .deps/kafka/lib
CASSANDRA_LIB := .deps/cassandra/lib
DYNALITE_VERSION := 4.0.0
DYNALITE := .deps/dynalite/node_modules/dynalite/cli.js
UPLOT_VERSION := 1.6.32
UPLOT_DIR := .deps/uplot
# uv installs the venv from uv.lock (the versions the tests passed with); it lives in its own venv in .deps.
UV_VERSION := 0.13.8
UV_VENV := .deps/uv-$(UV_VERSION)
UV := $(UV_VENV)/bin/uv
# --locked: stop if uv.lock no longer matches pyproject.toml (run `make lock`) instead of re-resolving.
# Never a downloaded interpreter (machines reach PyPI only): the venv's own Python.
UV_SYNC := UV_PYTHON_DOWNLOADS=never $(UV) sync --locked --python $(PY)
DEMO ?= 1
FRESH ?= 0
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the integration tests mostly wait on real parts, so 3 fit on 2 cores.
TEST_PROCESSES ?= 3

.PHONY: run test chaos install install-test install-cassandra clients lock bench bench-parse bench-query bench-stores bench-store typecheck lint docs clean browser prometheus

# FRESH=1 empties data/ (Kafka's log, dynalite's tables, the worker's state) before starting.
# Cassandra's jars come too, whatever METRICS_STORE says: a store migration started while this runs
# (`minutely migration start --to cassandra`) starts a local node, which make cannot foresee. 66 MB once,
# a stamp check after.
run: install install-cassandra
	$(if $(filter 1,$(FRESH)),rm -rf data,)
	$(PY) -m app local $(if $(filter 0,$(DEMO)),--no-demo,)

test: install-test lint typecheck docs browser prometheus
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --durations=15 $(PYTEST_ARGS)

typecheck: install-test
	$(PY) -m mypy

# ruff, as configured in pyproject.toml ([tool.ruff]): lint only, the code is not reformatted.
lint: install-test
	$(PY) -m ruff check app agents tables tests

# The reference in docs/ (mkdocs-material, from the test extra), built into artifacts/ (never the tracked tree).
# --strict (and mkdocs.yml's validation) fails on a broken link or anchor and on a page missing from the nav.
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir artifacts/site

# The reliability campaign's long versions (docs/reliability.md): a 5-minute worker crash loop (own and empty
# state), Kafka and the store gone 60 s, the ingest at 2x capacity for 60 s, 300 generated requests per API
# operation, ~100,000 hostile records, a flooding app beside a quiet one for 60 s. `make test` runs short ones. Each test's figure is in its PASSED section.
chaos: install-test browser
	MINUTELY_CHAOS=1 $(PY) -m pytest -q -n 2 -rP tests/integration/test_worker_faults.py \
	  tests/integration/test_broker_faults.py tests/integration/test_store_faults.py tests/integration/test_overload.py \
	  tests/api/test_schemathesis.py tests/tables/test_windows.py tests/api/test_tenant_isolation.py \
	  tests/integration/test_noisy_neighbour.py

bench: install-test
	$(PY) -m tests.bench.bench_pipeline
	$(PY) -m tests.bench.bench_ingest
	$(PY) -m tests.bench.bench_otlp

# Hostile drain lines: the parse rate of every line family with every field grown to 64 KB (linear = 4x).
bench-parse: install-test
	$(PY) -m tests.bench.bench_parse

# What `make run` needs: the package at uv.lock's versions, Apache Kafka (Maven Central), dynalite (npm), uPlot.
install: $(VENV)/.installed $(KAFKA_LIB)/.resolved $(DYNALITE) $(UPLOT_DIR)/dist/uPlot.iife.min.js

# What the tests add: pytest and friends, moto's server, checkov in its own venv, Apache Cassandra.
install-test: install $(VENV)/.installed-test .deps/checkov/bin/checkov install-cassandra clients

# Apache Cassandra for the embedded stack (METRICS_STORE=cassandra, or a store migration): 66 MB from Maven.
install-cassandra: $(CASSANDRA_LIB)/.resolved

# Real third-party clients for the tests (tests/clients/): the OpenTelemetry JS SDK's JSON exporter (npm, as
# locked) and a Go program on heroku/x hmetrics (Go module proxy, as go.sum pins it; its module cache in .deps).
HMETRICS_CLIENT := .deps/clients/hmetrics-client
GO_ENV := GOPATH=$(CURDIR)/.deps/go GOMODCACHE=$(CURDIR)/.deps/go/mod GOCACHE=$(CURDIR)/.deps/go/cache GOFLAGS=-mod=readonly
clients: $(HMETRICS_CLIENT) tests/clients/otel-js/node_modules/.installed

$(HMETRICS_CLIENT): tests/clients/hmetrics/main.go tests/clients/hmetrics/go.mod tests/clients/hmetrics/go.sum
	@command -v go >/dev/null 2>&1 || { echo "go not found: install Go (Debian golang)"; exit 1; }
	cd tests/clients/hmetrics && $(GO_ENV) go build -o $(CURDIR)/$@ .

# npm ci: exactly package-lock.json's versions (it stops if package.json no longer matches the lock).
tests/clients/otel-js/node_modules/.installed: tests/clients/otel-js/package.json tests/clients/otel-js/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 20 and npm"; exit 1; }
	npm ci --prefix tests/clients/otel-js --no-audit --no-fund --loglevel=error
	touch $@

# checkov (chart/Dockerfile scans in tests/test_deploy.py) pins boto3 versions that break aioboto3: own venv.
.deps/checkov/bin/checkov:
	$(PYTHON) -m venv .deps/checkov
	.deps/checkov/bin/pip install -q checkov==3.3.30

# The runtime dependencies as locked. --inexact: `make run` leaves what `make test` installed in place.
$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(UV_SYNC) --inexact
	touch $@

# The test extra (with the docs tools) as locked, exactly: a package dropped from the lock leaves the venv.
$(VENV)/.installed-test: pyproject.toml uv.lock $(VENV)/.installed
	$(UV_SYNC) --extra test
	touch $@

# Re-resolve uv.lock after editing pyproject.toml's dependencies: pins that still fit stay as they are.
# `make lock UPGRADE=1` moves every pin to the newest version allowed.
lock: | $(UV)
	UV_PYTHON_DOWNLOADS=never $(UV) lock $(if $(filter 1,$(UPGRADE)),--upgrade,)

$(UV):
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install -q uv==$(UV_VERSION)

# A JVM part's jars from Maven Central, as pinned in a small pom in the repo: $(call maven_jars,<pom>,<lib dir>)
define maven_jars
	@command -v java >/dev/null 2>&1 || { echo "java not found: install Java 17 (Debian openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null 2>&1 || { echo "mvn not found: install Maven (Debian maven)"; exit 1; }
	rm -rf $(2).new
	mvn -q -B -f $(1) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(2).new
	rm -rf app/local/conf/target
	touch $(2).new/.resolved
	rm -rf $(2) && mv $(2).new $(2)
endef

# Apache Kafka and its runtime dependencies.
$(KAFKA_LIB)/.resolved: app/local/conf/kafka-pom.xml
	$(call maven_jars,$<,$(KAFKA_LIB))

# Apache Cassandra 5.0 and its runtime dependencies from Maven Central (the second store: METRICS_STORE=cassandra
# or a migration's target; `make run` and `make test` install it).
$(CASSANDRA_LIB)/.resolved: app/local/conf/cassandra-pom.xml
	$(call maven_jars,$<,$(CASSANDRA_LIB))

# dynalite: an open-source (Apache-2.0) DynamoDB server on LevelDB, run on the machine's Node.js.
$(DYNALITE):
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 20 and npm"; exit 1; }
	npm install --prefix .deps/dynalite --no-audit --no-fund --loglevel=error dynalite@$(DYNALITE_VERSION)

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

# A real Prometheus server and promtool (Debian's prometheus, 2.42) for the PromQL differential test
# (tests/api/test_prometheus_differential.py); not started as a service: the test runs its own on loopback.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
		&& { systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true; }; \
	else echo "prometheus/promtool missing and not root: run 'apt-get install prometheus'"; fi

# wrk (Debian) generates the query benchmark's load from a separate process.
# Both stores from one process: write rate, uncached query latency, and the cost of shadow reads.
bench-stores: install-test
	$(PY) -m tests.bench.bench_stores

# Store cost (issue 23): DynamoDB write units, bytes at rest and Cassandra bytes per series-minute of the working
# tree against the commit before the compact layout (a git worktree in /tmp, made when absent), from the same
# seeds; then the stored digests' percentile error against numpy. `--quick` (4 h, no 30 d) while developing.
bench-store: install-test
	$(PY) -m tests.bench.bench_store

bench-query: install-test
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; } || echo "wrk missing: apt-get install wrk"
	$(PY) -m tests.bench.bench_query

clean:
	rm -rf $(VENV) .deps artifacts data .pytest_cache .mypy_cache
