PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint layers clean bench

$(BIN)/prefstream: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(BIN)/prefstream

# `@`: make echoes no command line, so `make demo ARGS=--json` prints JSON only
demo: install
	@$(BIN)/prefstream demo $(ARGS)

# Most tests wait on a broker, a worker or a subprocess: three pytest-xdist workers keep two
# cores busy. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
test: layers
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

# The pure tests only: no broker, no worker process, no training (markers `broker` and `slow`,
# tests/conftest.py). In one process: on two cores the xdist workers' start-up costs more than
# they save here. Under a minute.
FAST_WORKERS ?= 0
test-fast: layers
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) -m "not broker and not slow" $(ARGS)

# The import contracts of pyproject.toml ([tool.importlinter]): layers only point down.
layers: install
	$(BIN)/python tools/lint_layers.py

lint: layers
	$(BIN)/ruff check .

# Every benchmark, then docs/benchmarks.md from benchmarks/results/*.json. Skip some with
# BENCH_SKIP="trainer queries" (or comma-separated): their last JSON is reused and marked so.
# The trainer benchmark needs the optional extra: pip install -e '.[bench]'.
# A soak whose verdict fails exits 1; the report is still rendered, verdict included.
BENCH_SKIP ?=
BENCH_DATA ?= ../shared/data/hh-rlhf-harmless-dev.jsonl.gz
BENCH_QUALITY_EVENTS ?= 5000
BENCH_EVENTS ?= 100000
BENCH_OPEN_SESSIONS ?= 100000
BENCH_PAIRS ?= 10000000
BENCH_SOAK_MINUTES ?= 30
comma := ,
bench_skipped = $(filter $(1),$(subst $(comma), ,$(BENCH_SKIP)))

bench: install
	$(if $(call bench_skipped,quality),,$(BIN)/python benchmarks/bench_quality.py \
		--source $(BENCH_DATA) --events $(BENCH_QUALITY_EVENTS))
	$(if $(call bench_skipped,reward),,$(BIN)/python benchmarks/bench_reward.py)
	$(if $(call bench_skipped,pipeline),,$(BIN)/python benchmarks/bench_pipeline.py \
		--events $(BENCH_EVENTS) --open-sessions $(BENCH_OPEN_SESSIONS))
	$(if $(call bench_skipped,trainer),,$(BIN)/python benchmarks/bench_trainer.py \
		--data $(BENCH_DATA))
	$(if $(call bench_skipped,queries),,$(BIN)/python benchmarks/bench_queries.py \
		--pairs $(BENCH_PAIRS))
	$(if $(call bench_skipped,soak),,-$(BIN)/python benchmarks/soak.py \
		--minutes $(BENCH_SOAK_MINUTES))
	$(BIN)/python benchmarks/report.py --reused "$(subst $(comma), ,$(BENCH_SKIP))"

clean:
	rm -rf $(VENV) .pytest_cache prefstream-data
