#!/bin/bash
# `make test-containers`: the components in the cpu image, through kfp.local's DockerRunner.
#
#   1. engine: podman with runc serving the Docker API on a unix socket (engine.sh), started when
#      none answers and stopped at the end;
#   2. base:   localhost/bookworm-py311 from Debian packages (make-base.sh), skipped when cached;
#   3. build:  images/cpu on that base (build-cpu.sh), layers cached;
#   4. node:   the cpu image as TrainJob node of the kubeflow SDK's container backend
#              (build-trainer-node.sh, one layer);
#   5. tests:  pytest -m containers tests/containers (the multinode TrainJob tests among them),
#              DOCKER_HOST pointing at the engine.
#
# Usage: test-containers.sh [PYTEST ARGS...]
# Environment: IMAGE (default localhost/cascade-rcnn-cpu:local), BASE_IMAGE, ENGINE_DIR, PYTHON.
# Prints each step's wall time at the end.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
image=${IMAGE:-localhost/cascade-rcnn-cpu:local}
python=${PYTHON:-$root/.venv/bin/python}

timings=()
step() {
    local name=$1 start=$SECONDS rc=0
    shift
    echo "==> $name" >&2
    "$@" || rc=$?
    timings+=("$(printf '%-8s %4d s%s' "$name" $((SECONDS - start)) "$([ $rc = 0 ] || echo " (failed: $rc)")")")
    return $rc
}
report() {
    local rc=$?
    if [ ${#timings[@]} -gt 0 ]; then
        echo "==> wall time per step:" >&2
        printf '    %s\n' "${timings[@]}" >&2
    fi
    if [ "${started:-0}" = 1 ]; then
        "$here/engine.sh" stop || true
    fi
    return $rc
}
trap report EXIT

prepare_engine() {
    CONTAINERS_CONF=$("$here/engine.sh" config) # installs podman and runc when missing
    export CONTAINERS_CONF
    if ! "$here/engine.sh" status; then
        "$here/engine.sh" start
        started=1
    fi
    eval "$("$here/engine.sh" env)"
}
started=0
step engine prepare_engine
step base "$here/make-base.sh" "${BASE_IMAGE:-localhost/bookworm-py311}"
# The build holds two copies of a 6 GB environment at once (the install step's container and the
# layer committed from it); say what there is, so that a failure for space reads as one.
echo "==> disk: $(df -h --output=avail /var/lib/containers 2>/dev/null | tail -1 | tr -d ' ') free for podman's storage" >&2
step build "$here/build-cpu.sh" "$image"
step node "$here/build-trainer-node.sh" "$image" "$image-node"
cd "$root"
step tests env CASCADE_RCNN_TEST_IMAGE="$image" CASCADE_RCNN_TEST_NODE_IMAGE="$image-node" \
    "$python" -m pytest -m containers tests/containers "$@"
