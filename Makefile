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
DEMO ?= 1
FRESH ?= 0
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the integration tests mostly wait on real parts, so 3 fit on 2 cores.
TEST_PROCESSES ?= 3

.PHONY: run test chaos install install-test install-cassandra bench bench-parse bench-query bench-stores typecheck clean browser

# FRESH=1 empties data/ (Kafka's log, dynalite's tables, the worker's state) before starting.
run: install
	$(if $(filter 1,$(FRESH)),rm -rf data,)
	$(PY) -m app local $(if $(filter 0,$(DEMO)),--no-demo,)

test: install-test typecheck browser
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --durations=15 $(PYTEST_ARGS)

typecheck: install-test
	$(PY) -m mypy

# The reliability campaign's long versions (README "Reliability"): a 5-minute worker crash loop (own and empty
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

# Hostile drain lines: the parse rate of every line family with every field grown to 64 KB (linear = 4x).
bench-parse: install-test
	$(PY) -m tests.bench.bench_parse

# What `make run` needs: the package, Apache Kafka (Maven Central), dynalite (npm), the dashboard's uPlot.
install: $(VENV)/.installed $(KAFKA_LIB)/.resolved $(DYNALITE) $(UPLOT_DIR)/dist/uPlot.iife.min.js

# What the tests add: pytest and friends, moto's server, checkov in its own venv, Apache Cassandra.
install-test: install $(VENV)/.installed-test .deps/checkov/bin/checkov install-cassandra

# Apache Cassandra for the embedded stack (METRICS_STORE=cassandra, or a store migration): 66 MB from Maven.
install-cassandra: $(CASSANDRA_LIB)/.resolved

# checkov (chart/Dockerfile scans in tests/test_deploy.py) pins boto3 versions that break aioboto3: own venv.
.deps/checkov/bin/checkov:
	$(PYTHON) -m venv .deps/checkov
	.deps/checkov/bin/pip install -q checkov==3.3.30

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# A JVM part's jars from Maven Central, as pinned in a small pom in the repo: $(call maven_jars,<pom>,<lib dir>)
define maven_jars
	@command -v java >/dev/null 2>&1 || { echo "java not found: install Java 17 (Debian openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null 2>&1 || { echo "mvn not found: install Maven (Debian maven)"; exit 1; }
	rm -rf $(2)
	mvn -q -B -f $(1) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(2)
	rm -rf app/local/conf/target
	touch $(2)/.resolved
endef

# Apache Kafka and its runtime dependencies.
$(KAFKA_LIB)/.resolved: app/local/conf/kafka-pom.xml
	$(call maven_jars,$<,$(KAFKA_LIB))

# Apache Cassandra 5.0 and its runtime dependencies from Maven Central (the second store; `make run` stores in
# DynamoDB and needs it only for METRICS_STORE=cassandra or a migration: `make install-cassandra`).
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

# wrk (Debian) generates the query benchmark's load from a separate process.
# Both stores from one process: write rate, uncached query latency, and the cost of shadow reads.
bench-stores: install-test
	$(PY) -m tests.bench.bench_stores

bench-query: install-test
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; } || echo "wrk missing: apt-get install wrk"
	$(PY) -m tests.bench.bench_query

clean:
	rm -rf $(VENV) .deps artifacts data .pytest_cache .mypy_cache
