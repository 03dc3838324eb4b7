# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch as the developers' machines serve it; a CANN/CUDA image brings its own (see images/).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test lint unit test-containers clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev,pipeline]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench components pipelines
	$(VENV)/bin/ruff format --check src tests bench components pipelines

unit: $(STAMP)
	$(VENV)/bin/pytest -m "not containers" $(PYTEST_ARGS)

test: lint unit

# The retraining pipeline (ingest, check for new data, weights, train, evaluate, promote) under
# kfp.local on CPU, against a SeaweedFS on 127.0.0.1 that keeps its data in demo_out/s3, on a
# generated shapes data set. The first run trains and promotes; a second one finds the data
# unchanged and skips. demo_out/summary.json says which. The training pipeline alone:
# `python -m pipelines run-local`.
demo: $(STAMP)
	$(PY) -m pipelines run-local --pipeline retraining

# The components in the cpu image through kfp.local's DockerRunner (podman serving the Docker API; root).
# First run about 10-12 min (base image, image build); an unchanged tree about 35 s, plus the
# multinode TrainJob tests (kubeflow SDK container backend: one container per node).
test-containers: $(STAMP)
	bash images/local/test-containers.sh $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache demo_out
