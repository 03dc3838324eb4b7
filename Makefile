# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The supported torch range, tested at both ends (README, "Images and manifests"):
# TORCH_PINS, the newest, is what we develop on and the cpu image ships; COMPAT_TORCH_PINS, the
# oldest, is what the Ascend CANN 8.2.RC1 and CUDA images ship. tests/test_torch_range.py holds
# pyproject.toml's floor and every pin in images/ to these two lines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
COMPAT_TORCH_PINS ?= torch==2.5.1 torchvision==0.20.1
PYTEST_ARGS ?=
# The model-level tests run again on the oldest torch: detectron2 parity (inference and the
# training step, dynamic and static), static mode with torch.compile, ops, engine, and the CLI's
# train, evaluate and predict (dynamic, and static with --eval-after). test_static_cli's compiled
# CLI run is left to `make test`: test_static_compile compiles the same steps here, in less time.
COMPAT_VENV  := .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/test_parity.py tests/test_train_parity.py tests/test_static_parity.py \
	tests/test_static_inference.py tests/test_static_compile.py tests/test_static_ops.py \
	tests/test_ops.py tests/test_modeling.py tests/test_engine_loop.py tests/test_engine_solver.py \
	tests/test_engine_checkpoint.py tests/test_engine_launch.py \
	tests/test_static_cli.py::test_train_eval_and_predict_in_static_mode \
	tests/test_trained_checkpoint.py tests/test_comm.py tests/test_torch_range.py

.PHONY: venv demo test lint unit browser test-compat test-containers clean

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

# Its own venv; pip's cache (~/.cache/pip) keeps torch's wheels between runs, so a rebuild of
# .venv-compat downloads nothing. The pins go in with the package so its ranges cannot lift them.
$(COMPAT_STAMP): pyproject.toml Makefile
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_TORCH_PINS) -e '.[dev,pipeline]'
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -c "import torch, torchvision; print('test-compat: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	$(COMPAT_VENV)/bin/pytest -m "not containers" $(COMPAT_TESTS) $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(COMPAT_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache demo_out
