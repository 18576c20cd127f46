# The two set-up commands of the README: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned, so pip takes the local CPU wheel instead of a CUDA build.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/eas serve

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q || [ $$? -eq 5 ]  # 5 = no tests collected

.PHONY: install serve test
