#!/bin/bash
# Builds (and pushes) the images under the names the pipeline compile expects:
#   REGISTRY/cascade-rcnn-TARGET:TAG   for TARGET in cpu, ascend, ascend-cann8.5, cuda
#
# Usage: images/build.sh [--engine docker|podman] [--registry R] [--tag T] [--push]
#                        [--platform P] [--build-arg K=V]... [--dry-run] [TARGET...]
# Without TARGETs it builds cpu and ascend (what the training pipeline runs). Build args go to
# every target (e.g. --build-arg BASE_IMAGE=... when one target is named). A target is
# images/TARGET/Dockerfile, or images/TARGET/build-args: another target's Dockerfile (its DOCKERFILE
# line) built with the KEY=VALUE lines there as build args, given before the command line's.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
targets_all=(cpu ascend ascend-cann8.5 cuda)
engine=${ENGINE:-docker}
registry=${REGISTRY:-localhost}
tag=${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)}
push=0
dry_run=0
platform=
build_args=()
targets=()

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --engine) engine=${2:?--engine needs a value}; shift 2 ;;
        --registry) registry=${2:?--registry needs a value}; shift 2 ;;
        --tag) tag=${2:?--tag needs a value}; shift 2 ;;
        --platform) platform=${2:?--platform needs a value}; shift 2 ;;
        --build-arg) build_args+=(--build-arg "${2:?--build-arg needs K=V}"); shift 2 ;;
        --push) push=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(cpu ascend)
fi
if [ -z "$tag" ]; then
    echo "build.sh: no --tag given and no version in pyproject.toml" >&2
    exit 2
fi
for target in "${targets[@]}"; do
    if [ ! -f "$root/images/$target/Dockerfile" ] && [ ! -f "$root/images/$target/build-args" ]; then
        echo "build.sh: unknown target '$target' (targets: ${targets_all[*]})" >&2
        exit 2
    fi
done

run() {
    echo "+ $*"
    if [ "$dry_run" -eq 0 ]; then
        "$@"
    fi
}

platform_args=()
if [ -n "$platform" ]; then
    platform_args=(--platform "$platform")
fi
for target in "${targets[@]}"; do
    image="${registry%/}/cascade-rcnn-$target:$tag"
    dockerfile="$root/images/$target/Dockerfile"
    target_args=()
    if [ ! -f "$dockerfile" ]; then
        while IFS= read -r line; do
            case "$line" in
                '' | '#'*) ;;
                DOCKERFILE=*) dockerfile="$root/${line#DOCKERFILE=}" ;;
                *) target_args+=(--build-arg "$line") ;;
            esac
        done < "$root/images/$target/build-args"
        target_args+=(--build-arg "IMAGE_TARGET=$target")
    fi
    run "$engine" build "${platform_args[@]}" "${target_args[@]}" "${build_args[@]}" \
        -f "$dockerfile" -t "$image" "$root"
    if [ "$push" -eq 1 ]; then
        run "$engine" push "$image"
    fi
done
