# Every target creates .venv and installs what it needs when missing. `demo` and `test` first
# check the Debian packages they need (scripts/system-packages.sh): installed with apt as root,
# otherwise the apt-get line is printed and make stops before anything runs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# perf_analyzer (the load gate's engine) in a venv of its own: see scripts/perf-analyzer-requirements.txt.
PERF_VENV  := .venv-perf
PERF_REQS  := scripts/perf-analyzer-requirements.txt
PERF_STAMP := $(PERF_VENV)/.installed-stamp

.PHONY: setup perf-analyzer demo down test lint bench schemas golden system-packages demo-packages

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

perf-analyzer: $(PERF_STAMP)

$(PERF_STAMP): $(PERF_REQS) | demo-packages
	test -x $(PERF_VENV)/bin/python || python3 -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install --quiet -r $(PERF_REQS)
	touch $(PERF_STAMP)

demo: demo-packages setup perf-analyzer
	$(VENV)/bin/gpufleet up --stack local

down: setup
	$(VENV)/bin/gpufleet down --stack local

test: system-packages setup perf-analyzer
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/yamllint --strict ansible .ansible-lint .yamllint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ansible-lint --profile production ansible

bench: setup perf-analyzer
	$(PY) bench/generate.py
	$(PY) bench/loadgen.py
	$(PY) bench/serving.py
	$(PY) bench/configure.py
	$(PY) bench/azure_preview.py
	$(PY) bench/serving_stack.py
	$(PY) bench/environment_up.py
	$(PY) bench/engines.py

schemas: setup
	$(VENV)/bin/gpufleet schema --out schemas

golden: setup
	$(VENV)/bin/gpufleet generate --out tests/golden/model_repository
