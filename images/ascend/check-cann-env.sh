#!/bin/bash
# Build-time check of the Ascend image: CANN must work without sourcing anything.
#
# Kubernetes replaces an image's ENTRYPOINT with the pod's command, so a KFP step never runs
# set_env.sh: the base image must carry CANN's environment as ENV (the official CANN images do).
# A base that only sources set_env.sh from a shell profile fails here, with what is missing.
set -uo pipefail

problems=()
on_path_list() {  # on_path_list LIST FILE: is FILE in one of LIST's colon-separated directories?
    local dir
    local -a dirs
    IFS=: read -ra dirs <<<"$1"
    for dir in "${dirs[@]}"; do
        if [ -n "$dir" ] && [ -e "$dir/$2" ]; then
            return 0
        fi
    done
    return 1
}

toolkit=${ASCEND_TOOLKIT_HOME:-${ASCEND_HOME_PATH:-}}
if [ -z "$toolkit" ] || [ ! -d "$toolkit" ]; then
    problems+=("ASCEND_TOOLKIT_HOME (or ASCEND_HOME_PATH) is not set to the toolkit's directory")
fi
if [ -z "${ASCEND_OPP_PATH:-}" ] || [ ! -d "${ASCEND_OPP_PATH:-}" ]; then
    problems+=("ASCEND_OPP_PATH is not set to the operator package directory")
fi
for lib in libascendcl.so libhccl.so; do
    if ! on_path_list "${LD_LIBRARY_PATH:-}" "$lib"; then
        problems+=("$lib is in no LD_LIBRARY_PATH directory")
    fi
done
# The driver's user-space libraries are mounted from the node at run time.
for dir in /usr/local/Ascend/driver/lib64/common /usr/local/Ascend/driver/lib64/driver; do
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$dir:"* | *":$dir/:"*) ;;
        *) problems+=("LD_LIBRARY_PATH lacks the driver directory $dir") ;;
    esac
done
if [ -n "$toolkit" ]; then
    case ":${PYTHONPATH:-}:" in
        *":$toolkit/python/site-packages:"* | *":$toolkit/python/site-packages/:"*) ;;
        *) problems+=("PYTHONPATH lacks $toolkit/python/site-packages (CANN's operator compiler)") ;;
    esac
fi

if [ "${#problems[@]}" -gt 0 ]; then
    echo "check-cann-env: the base image does not export CANN's environment as ENV:" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    echo "Pick a base that sets it (quay.io/ascend/cann) or add ENV lines copied from set_env.sh." >&2
    exit 1
fi
echo "check-cann-env: CANN at $toolkit is usable without set_env.sh"
