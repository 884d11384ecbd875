# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: setup demo test bench down lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/loopcast stack prepare
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/loopcast demo

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: setup
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

bench: setup
	$(VENV)/bin/loopcast bench

down:
	$(VENV)/bin/loopcast stack down

lint: setup
	$(VENV)/bin/ruff check .

clean: down
	rm -rf $(VENV)
