# Every target creates .venv and installs what it needs when missing. `demo` and `test` first
# check the Debian packages they need (scripts/system-packages.sh): installed with apt as root,
# otherwise the apt-get line is printed and make stops before anything runs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo down test lint bench schemas golden system-packages demo-packages

setup: $(STAMP)

system-packages:
	@scripts/system-packages.sh test

demo-packages:
	@scripts/system-packages.sh demo

# Order-only: python3-venv must be there to build .venv, but a check never rebuilds it.
$(STAMP): pyproject.toml | demo-packages
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build that lies on this machine's disk; a plain `torch` would pull CUDA (GBs).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: demo-packages setup
	$(VENV)/bin/gpufleet up --stack local

down: setup
	$(VENV)/bin/gpufleet down --stack local

test: system-packages setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/yamllint --strict ansible .ansible-lint .yamllint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ansible-lint --profile production ansible

bench: setup
	$(PY) bench/generate.py
	$(PY) bench/loadgen.py
	$(PY) bench/serving.py
	$(PY) bench/configure.py
	$(PY) bench/azure_preview.py
	$(PY) bench/serving_stack.py
	$(PY) bench/environment_up.py

schemas: setup
	$(VENV)/bin/gpufleet schema --out schemas

golden: setup
	$(VENV)/bin/gpufleet generate --out tests/golden/model_repository
