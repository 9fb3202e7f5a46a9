# The README's two commands: `make demo` and `make test`. Both set everything up on a
# fresh machine, are idempotent, and skip reinstalling when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test sysdeps bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "sni-lab needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's metadata changed (the package itself is editable).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@ $(VENV)/.installed

$(VENV)/.sysdeps: scripts/sysdeps.sh
	@sh scripts/sysdeps.sh && touch $@

sysdeps: $(VENV)/.sysdeps

demo: $(VENV)/.installed
	$(BIN)/sni-lab up

test: $(VENV)/.installed-test $(VENV)/.sysdeps
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test $(VENV)/.sysdeps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .lab .pytest_cache
