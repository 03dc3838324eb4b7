# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch as the developers' machines serve it; a CANN/CUDA image brings its own (see images/).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test lint unit browser test-containers clean

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

unit: $(STAMP) browser
	$(VENV)/bin/pytest -m "not containers" $(PYTEST_ARGS)

# Headless Chromium (Debian's package, with the DejaVu fonts the charts name) for the tests that open
# the report pages as a reader does (tests/browser.py). Installed when missing and apt-get can run as
# root, as in CI; elsewhere those tests skip, and under CI=true they fail without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; } || \
		echo "make browser: no chromium here and apt-get cannot install it; the page tests will skip"

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
