#!/bin/bash
# Shared package install of every image, run in each Dockerfile's build stage.
#
# Makes a virtual environment on top of the base image's Python, installs the pinned torch stack,
# then this repository's package with its extras, and checks what the KFP components run:
# `python3 -c "import cascade_rcnn, kfp"` and the `cascade-rcnn` command.
#
# The environment sees the base's site-packages (--system-site-packages): a CUDA base's torch and
# CANN's Python tools stay usable, and a torch the base already has at the pinned version is not
# downloaded again.
#
# Environment (the Dockerfiles pass their build args):
#   VENV                 where the environment goes (required, e.g. /opt/venv)
#   TORCH_VERSION        torch pin, e.g. 2.5.1 (required)
#   TORCHVISION_VERSION  the torchvision released with it, e.g. 0.20.1 (required)
#   TORCH_INDEX_URL      index serving that torch build (CPU or CUDA); empty: pip's own configuration
#   EXTRA_PACKAGES       pinned packages installed next to torch, e.g. "torch-npu==2.5.1.post1"
#   KEEP_BASE_PACKAGES   packages whose base-image version must not change, e.g. "numpy"
#   PACKAGE_EXTRAS       extras of this package, e.g. "pipeline,tensorboard"
#   PYTHON               interpreter the environment is made from (default python3)
#
# Usage: install.sh SOURCE_DIR   (SOURCE_DIR holds pyproject.toml, README.md and src/)
set -euo pipefail

src=${1:?usage: install.sh SOURCE_DIR}
: "${VENV:?set VENV}" "${TORCH_VERSION:?set TORCH_VERSION}" "${TORCHVISION_VERSION:?set TORCHVISION_VERSION}"
extras=${PACKAGE_EXTRAS:-pipeline}
python=${PYTHON:-python3}

echo "install.sh: environment $VENV from $("$python" --version 2>&1) at $(command -v "$python")"
"$python" -m venv --system-site-packages "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip --no-cache-dir --disable-pip-version-check --no-input)

# Every later install keeps these versions: the package's own ranges (torch>=...) must never
# replace the torch built for the accelerator.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$constraints"
for name in ${EXTRA_PACKAGES:-}; do
    echo "$name" >>"$constraints"
done
for name in ${KEEP_BASE_PACKAGES:-}; do
    if version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null); then
        echo "install.sh: keeping the base's $name $version"
        echo "$name==$version" >>"$constraints"
    fi
done

index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
fi
source_name=${TORCH_INDEX_URL:-the index pip is configured with}
echo "install.sh: torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION from $source_name"
"${pip[@]}" install "${index_args[@]}" -c "$constraints" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

if [ -n "${EXTRA_PACKAGES:-}" ]; then
    echo "install.sh: extra packages $EXTRA_PACKAGES"
    # shellcheck disable=SC2086  # a space-separated list of requirements
    "${pip[@]}" install -c "$constraints" $EXTRA_PACKAGES
fi

echo "install.sh: cascade-rcnn[$extras] from $src"
"${pip[@]}" install -c "$constraints" "$src[$extras]"

# torch >= 2.5 imports an installed device plugin (torch_npu) with torch itself, and that needs the
# NPU driver, which only the cluster's nodes have: check the Python side without it.
export TORCH_DEVICE_BACKEND_AUTOLOAD=0
EXTRA_PACKAGES=${EXTRA_PACKAGES:-} "$py" - <<'PY'
import importlib.metadata as md
import os

import cascade_rcnn  # noqa: F401  what the components import
import kfp  # noqa: F401  the components run with install_kfp_package=False
import torch
import torchvision

pins = {"torch": os.environ["TORCH_VERSION"], "torchvision": os.environ["TORCHVISION_VERSION"]}
for req in os.environ["EXTRA_PACKAGES"].split():
    name, _, version = req.partition("==")
    pins[name] = version
for name, want in pins.items():
    have = md.version(name).split("+")[0]
    if have != want:
        raise SystemExit(f"install.sh: {name} is {have}, the image pins {want}")
print(f"install.sh: torch {torch.__version__}, torchvision {torchvision.__version__}, kfp {md.version('kfp')}")
PY
test -x "$VENV/bin/cascade-rcnn" || { echo "install.sh: $VENV/bin/cascade-rcnn is missing" >&2; exit 1; }
"$VENV/bin/cascade-rcnn" --help >/dev/null
echo "install.sh: done"
