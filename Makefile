# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install install-test demo study headroom test test-all clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# uv installs the project and its dependencies (~10 s against pip's ~55 s: a fifth of the demo's spare time)
$(BIN)/uv: $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.installed: $(BIN)/uv pyproject.toml
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test,eval]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/dma demo

# The study (issues 10, 18; not in CI, resumable): runs/study/RESULTS.md. The pre-registered v2 main run took
# 98.7 min on 2 CPU cores, the first 19 shared with tests (RESULTS.md, run A). Side runs, each over 4 agent
# seeds, timed in run B on cores often shared with tests (2026-12-03): gen-code 13.9 min, gen-domains 12.6,
# gen-more-domains 15.4, gen-large 41.0 (19 of them pre-training the 3.59M target), wide-sweep 43.7, fidelity 8.1, CQL alpha 0 / 0.3 / 3: 12.2 / 15.5 / 12.1,
# no-feedback 11.7, the cql-chosen follow-up 31.7 and its generalisation runs (cql-chosen-gen-*) 10.6 (on 2026-12-02, quiet: gen-code 8, each ablation 6-7,
# cql-chosen 16). RESULTS.md was made with jaxlib's default matmuls (DMA_XLA_CPU_DEFAULTS=0); two runs matched
# bit for bit up to the gate, not the agents (RESULTS.md).
study: install
	$(BIN)/dma study

# Issue 17: the measured headroom of the mixing decision on the demo (resumable): runs/demo/headroom/headroom.md.
headroom: install
	$(BIN)/dma headroom

test: install-test
	$(BIN)/ruff check --select F,E9 dma_jax tests
	$(BIN)/lint-imports  # the layering contracts in pyproject.toml
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS)

test-all: test  # every test runs in `make test` (nothing is left for a nightly run); kept as an alias

clean:
	rm -rf $(VENV) runs demo_out
