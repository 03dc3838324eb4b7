#!/bin/bash
# Builds images/cpu with podman on the local base image (make-base.sh), with the host's pip
# configuration and the local wheel directories it names mounted read-only, so pip installs the
# same wheels the host has (torch among them) without a multi-GB download.
#
# Usage: build-cpu.sh [TAG]   (default localhost/cascade-rcnn-cpu:local)
# Environment:
#   BASE_IMAGE       default localhost/bookworm-py311
#   PYTHON           the Python whose pip configuration counts (default .venv/bin/python, else python3)
#   CONTAINERS_CONF  podman's config (default: the one engine.sh writes)
#   BUILD_ARGS       more `podman build` arguments, e.g. "--build-arg PACKAGE_EXTRAS=pipeline"
#
# Rebuilds are cheap when nothing changed: the image carries a label with the hash of its build
# context, base image and pip settings, and a build whose hash matches is skipped (podman's own
# layer cache would still hash the whole multi-GB build context). Layers are
# cached (--layers); the image a rebuild replaces is removed (it holds a 6 GB environment).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=${1:-localhost/cascade-rcnn-cpu:local}
base=${BASE_IMAGE:-localhost/bookworm-py311}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
CONTAINERS_CONF=${CONTAINERS_CONF:-$("$here/engine.sh" config)}
export CONTAINERS_CONF

say() { echo "build-cpu.sh: $*" >&2; }

podman image exists "$base" || {
    say "no base image $base: run images/local/make-base.sh first"
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mounts=()
while IFS= read -r spec; do
    mounts+=(-v "$spec")
done < <("$python" "$here/pip_config.py" "$work/pip.conf")
chmod 0644 "$work/pip.conf"

# What the build depends on: the files .dockerignore lets into the context, the base image, the
# build arguments and pip's settings.
context_hash() {
    {
        podman image inspect --format '{{.Id}}' "$base"
        echo "${BUILD_ARGS:-}"
        cat "$work/pip.conf"
        (
            cd "$root"
            find pyproject.toml README.md src configs images -type f \
                ! -path '*/__pycache__/*' ! -name '*.py[cod]' ! -path 'src/*.egg-info/*' -print0 |
                sort -z | xargs -0 sha256sum
        )
    } | sha256sum | cut -d' ' -f1
}
label=org.cascade-rcnn.build-context
hash=$(context_hash)
if [ "$(podman image inspect --format "{{index .Labels \"$label\"}}" "$tag" 2>/dev/null)" = "$hash" ]; then
    say "$tag is up to date (build context $hash)"
    exit 0
fi
say "pip configuration for the build:"
sed 's/^/    /' "$work/pip.conf" >&2

# TORCH_INDEX_URL empty: torch comes from the pip configuration above, not from download.pytorch.org.
args=(
    --network host
    --layers
    -f "$root/images/cpu/Dockerfile"
    --build-arg "BASE_IMAGE=$base"
    --build-arg "TORCH_INDEX_URL="
    -v "$work/pip.conf:/etc/pip.conf:ro"
    "${mounts[@]}"
)
# shellcheck disable=SC2206  # BUILD_ARGS is a word list by design
args+=(${BUILD_ARGS:-})

image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
old=$(image_id "$tag")

say "image -> $tag"
podman build "${args[@]}" --label "$label=$hash" -t "$tag" "$root"
if [ -n "$old" ] && [ "$old" != "$(image_id "$tag")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || say "kept the replaced image $old (in use)"
fi
say "$tag: $(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.1f GB", $1/1e9}')"
