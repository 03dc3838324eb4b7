#!/bin/bash
# Builds the TrainJob node image of the container-backend tests (trainer-node.Containerfile) on the
# cpu image: one small layer, rebuilt only when the cpu image changed.
#
# Usage: build-trainer-node.sh [CPU_IMAGE] [TAG]
#   defaults: localhost/cascade-rcnn-cpu:local, CPU_IMAGE with "-node" appended to its tag
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cpu=${1:-localhost/cascade-rcnn-cpu:local}
tag=${2:-$cpu-node}
CONTAINERS_CONF=${CONTAINERS_CONF:-$("$here/engine.sh" config)}
export CONTAINERS_CONF
label=org.cascade-rcnn.node-base
base_id=$(podman image inspect --format '{{.Id}}' "$cpu")
if [ "$(podman image inspect --format "{{index .Labels \"$label\"}}" "$tag" 2>/dev/null)" = "$base_id" ]; then
    echo "build-trainer-node.sh: $tag is up to date" >&2
    exit 0
fi
podman build --build-arg "IMAGE=$cpu" --label "$label=$base_id" -f "$here/trainer-node.Containerfile" -t "$tag" "$here"
