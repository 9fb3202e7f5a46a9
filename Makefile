# The README's two commands: `make demo` and `make test`. Both set everything up on a
# fresh machine, are idempotent, and skip reinstalling when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-py313 compose-test sysdeps bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "sni-lab needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's metadata changed (the package itself is editable).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,mitmproxy]'
	@touch $@ $(VENV)/.installed

$(VENV)/.sysdeps: scripts/sysdeps.sh
	@sh scripts/sysdeps.sh && touch $@

sysdeps: $(VENV)/.sysdeps

demo: $(VENV)/.installed
	$(BIN)/sni-lab up

# The whole suite on this Python (mitmproxy 11.x on 3.11), then the engine tests again on
# Python 3.13 with mitmproxy 12.x when a 3.13 is on the machine.
test: $(VENV)/.installed-test $(VENV)/.sysdeps
	$(BIN)/python -m pytest
	sh scripts/py313.sh -q

test-py313:
	sh scripts/py313.sh

# docker-compose.yml brought up for real (root; installs Docker from Debian, see the script).
compose-test: $(VENV)/.installed
	PYTHON=$(BIN)/python sh scripts/compose-test.sh

bench: $(VENV)/.installed-test $(VENV)/.sysdeps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .lab .pytest_cache
