# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine with only
# Python 3.11+, Java 17+ and Maven installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := deploy/kafka/kafka.sh

.PHONY: install kafka-up kafka-down kafka-up-secure kafka-down-secure prometheus test unit lint format demo bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

kafka-up:
	$(KAFKA) up

kafka-down:
	$(KAFKA) down

# The SASL_SSL broker (SCRAM-SHA-512, ACLs) on 127.0.0.1:9192, beside the plain one; its CA and
# passwords are in deploy/kafka/.state-secure/secure/ (see deploy/kafka/README.md).
kafka-up-secure:
	KAFKA_SECURE=1 $(KAFKA) up

kafka-down-secure:
	KAFKA_SECURE=1 $(KAFKA) down

# prometheus and promtool for the tests (Debian's package; nothing to do when both are on PATH).
prometheus:
	deploy/prometheus/ensure-prometheus.sh

# The broker is brought down even when the tests fail; the tests' exit status is kept.
test: install prometheus
	$(KAFKA) up
	status=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; $(KAFKA) down; exit $$status

unit: install
	$(BIN)/python -m pytest -m 'not integration' $(PYTEST_ARGS)

# Broker, worker, the bundled sample news, entities as they arrive, a metrics summary; stops all.
demo: install
	deploy/demo.sh

# Benchmarks (docs/benchmarks.md): model core, end to end through the local broker (started and
# stopped here when it is not already running), spaCy as the peer. BENCH_QUICK=1 for a smoke run;
# run_all.py flags in BENCH_ARGS (e.g. BENCH_ARGS="--model my.nerm").
bench: install
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

# Soak (not in CI; docs/operations.md, "Soak"): one worker for 30 minutes at half its saturating
# rate, sampled every 10 s; benchmarks/results/soak.{json,md}. SOAK_ARGS for benchmarks/soak.py
# (e.g. SOAK_ARGS="--minutes 2" for a smoke run). The local broker is started, and stopped again,
# only when it is not running.
soak: install
	@started=0; \
	if ! $(KAFKA) status >/dev/null; then $(KAFKA) up || exit 1; started=1; fi; \
	status=0; $(BIN)/python -m benchmarks.soak $(SOAK_ARGS) || status=$$?; \
	if [ $$started = 1 ]; then $(KAFKA) down; fi; exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
