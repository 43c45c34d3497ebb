# HQOD-D2: `make demo` runs the main job on the embedded dataset, `make test` runs the tests.
# Both set up everything first (tools/install.sh: .venv with pinned deps + detectron2; idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: install data demo test clean-venv

install:
	bash tools/install.sh

data: install
	$(PY) tools/generate_digits.py

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m pytest tests -q

clean-venv:
	rm -rf $(VENV)
