# Every target does its own set-up: `make test` on a fresh clone creates .venv and installs the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all style lint bench experiments clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) recipes/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py --readme
	$(PY) benchmarks/variant_overhead.py --readme
	$(PY) benchmarks/variant_overhead.py --optimizer adamw --readme
	$(PY) benchmarks/variant_overhead.py --optimizer adamw --image-size 224 --readme --variants SAM \
		"Momentum-SAM, sam_mode='momentum'" "sam_mode='adam_update'"
	$(PY) benchmarks/soak.py --readme
	$(PY) benchmarks/memory.py --readme
	$(PY) benchmarks/one_pass_drift.py --readme

experiments: $(STAMP)
	$(PY) experiments/run_all.py
	$(PY) experiments/benefit.py --readme
	$(PY) experiments/benefit.py --optimizer adamw --readme
	$(PY) experiments/benefit.py --model vit --optimizer adamw --seeds 8 --readme
	$(PY) experiments/rho_transformer.py --readme
	$(PY) experiments/budget_guide.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
