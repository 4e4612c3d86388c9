# The two commands of the README, and the load tests and benchmarks.
# Each target makes or reuses .venv from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test bench loadtest clean

$(STAMP): pyproject.toml tafe/profiler/_accel.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# One worker per core by default (RUN_ARGS="--workers 1" for one).
RUN_ARGS ?= --workers 0

run: $(STAMP)
	$(BIN)/tafe up $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Load test against a running TAFE (make run, or tafe up): locust headless for a bounded
# time; locust's CSV and a JSON summary (rps, p50/p95/p99, failures, bid rate) in $(LOADTEST_OUT).
HOST         ?= http://127.0.0.1:8080
DURATION     ?= 60s
USERS        ?= 32
SPAWN_RATE   ?= $(USERS)
LOADTEST_OUT ?= benchmarks/out/loadtest

loadtest: $(STAMP)
	mkdir -p $(LOADTEST_OUT)
	TRAFFIC_SUMMARY=$(LOADTEST_OUT)/summary.json $(BIN)/locust -f benchmarks/locustfile.py --headless \
		--host $(HOST) -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) --stop-timeout 5 \
		--csv $(LOADTEST_OUT)/locust --only-summary

# The side-by-side benchmarks and a recorded load test of a whole node (< 15 minutes); each
# installs what it needs (apache2, mod_wsgi, wrk, nginx, bjoern) and rewrites its own
# section of benchmarks/RESULTS.md.
BENCH_STAMP = $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/threads_vs_greenlets/run.py --record $(TVG_ARGS)
	$(BIN)/python benchmarks/throughput/run.py --record $(THROUGHPUT_ARGS)
	$(BIN)/python benchmarks/loadtest.py --record $(LOADTEST_ARGS)
	$(BIN)/python benchmarks/json_parse.py --record --rounds 3

clean:
	rm -rf $(VENV) build *.egg-info
