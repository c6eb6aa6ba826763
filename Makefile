# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the embedded defaults
#   make test   the same install, then the test suite (make test-fast: the unit tests alone, ~1 minute)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The install is redone only when a dependency file changes.
DEPS_HASH := $(shell cat pyproject.toml requirements/*.txt scripts/install.sh 2>/dev/null | sha1sum | cut -c1-12)
STAMP  := $(VENV)/.installed-$(DEPS_HASH)
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: demo test test-fast install clean bench

install: $(STAMP)

$(STAMP):
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install.sh
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tlcr pipeline --config $(DEMO_CONFIG)

test: $(STAMP)
	bash scripts/run_tests.sh

test-fast: $(STAMP)
	bash scripts/run_tests.sh tests/unit

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
