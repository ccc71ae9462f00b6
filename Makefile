# The two commands of the README. Both work from a fresh clone with nothing installed.
#   make demo   install everything, then run the embedded demo end to end on CPU
#   make test   install everything, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	@# On a GPU machine whose Python already has (CUDA) torch, the venv sees it instead of
	@# installing the CPU build.
	python3 -c "import torch" 2>/dev/null && python3 -m venv --system-site-packages $(VENV) || python3 -m venv $(VENV)
	PYTHON=$(PY) scripts/install.sh --dev
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sit run

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run_all

clean:
	rm -rf $(VENV) runs test-output
