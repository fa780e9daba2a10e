# triage: `make run` shows it working; `make test` proves it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start API + worker on the embedded default (SQLite, embedded Redis, offline backend) and
## triage the sample tickets. DATABASE_URL / REDIS_URL / ANTHROPIC_API_KEY switch to real ones.
run: $(STAMP)
	$(BIN)/triage run

## Lint, type-check and run the whole suite against the machine's PostgreSQL and Redis.
test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy triage

# Three processes on two cores, a test file each at a time: most tests wait on workers,
# servers and timeouts rather than compute (two processes kept the cores about 60% busy), and
# the fault scenarios (a quarter of the run) use servers of their own. Each process leases its
# own Redis database and creates its own PostgreSQL databases.
pytest: $(STAMP)
	$(BIN)/pytest -n 3 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
