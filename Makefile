# Two commands from a fresh machine: `make demo` (the whole pipeline locally on the embedded
# defaults) and `make test`. Both create .venv and install the pinned dependencies when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: venv demo test test-gpu compile bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

test: venv
	$(PY) -m pytest tests -q

test-gpu: venv
	$(PY) -m pytest tests -q -m gpu

clean:
	rm -rf $(VENV) runs out .pytest_cache
