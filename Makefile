# Set-up, demo and tests. Every target installs what it needs into $(VENV) first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
# Where the full CIFAR-10 shards (gzip-compressed tars) are read from by data-cifar10.
SHARED_DATA ?= ../shared/data
# Processes of the demo; the demo config has d = 3 branches, one per process.
DEMO_PROCESSES ?= 3
PYTEST_ARGS ?=

.PHONY: install demo test test-fast docker clean-runs data-cifar10 experiment

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	OMP_NUM_THREADS=1 $(TORCHRUN) --standalone --nproc-per-node $(DEMO_PROCESSES) \
		-m lookaround_dist.cli.train --config configs/demo.yaml

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

docker:
	docker build -f docker/Dockerfile -t lookaround-dist:latest .

clean-runs:
	rm -rf runs

# Plain-tar copies of the full CIFAR-10 shards for configs/cifar10.yaml (DALI reads plain tars).
data-cifar10:
	mkdir -p data/cifar10
	for f in $(SHARED_DATA)/cifar10/*.tar.gz; do \
		out=data/cifar10/$$(basename $$f .gz); [ -e $$out ] || gunzip -c $$f > $$out; done

# The method comparison (lookaround, sgd, independent, lookahead, SWA; two seeds each) on
# CIFAR-10, about one hour on 2 cores; rerunning continues where it stopped.
experiment: install
	$(PYTHON) scripts/run_experiment.py --data $(SHARED_DATA)/cifar10 --output runs/experiment
