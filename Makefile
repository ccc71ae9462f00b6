# The two commands of the README. Both work from a fresh clone with nothing installed.
#   make demo   install everything, then run the embedded demo end to end on CPU
#   make test   install everything, then run the test suite
# PYTHON: the interpreter the venv is made from (3.11 or newer), e.g. `make PYTHON=python3.11 demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
	  found=$$($(PYTHON) -c 'import sys; print("Python %d.%d.%d (%s)" % (sys.version_info[:3] + (sys.executable,)))' 2>/dev/null) \
	    || found="'$(PYTHON)', which does not run"; \
	  echo "error: sit needs Python 3.11 or newer; this is $$found. fix: install python3.11 and run \`make PYTHON=python3.11 $(or $(MAKECMDGOALS),demo)\`" >&2; exit 1; }
	@# On a GPU machine whose Python already has (CUDA) torch, the venv sees it instead of
	@# installing the CPU build.
	$(PYTHON) -c "import torch" 2>/dev/null && $(PYTHON) -m venv --system-site-packages $(VENV) || $(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) scripts/install.sh --dev
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sit run

test: install
	$(PY) -m pytest -q --durations=30

bench: install
	$(PY) bench/run_all

clean:
	rm -rf $(VENV) runs test-output
