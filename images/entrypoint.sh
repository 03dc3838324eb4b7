#!/bin/bash
# Entry point of every image: completes CANN's environment when a toolkit is installed, then runs
# the given command (`docker run IMAGE cascade-rcnn ...`, kfp.local's DockerRunner).
#
# Kubernetes replaces an image's ENTRYPOINT with the pod's command, so a KFP step never runs this:
# whatever a step needs is ENV in the image. Sourcing set_env.sh here adds what it computes at run
# time (paths that depend on the machine's architecture).
# CANN_SET_ENV_SCRIPTS: candidates, first one present wins (the toolkit, then the NNAE runtime).
for env_script in ${CANN_SET_ENV_SCRIPTS:-/usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnae/set_env.sh}; do
    if [ -f "$env_script" ]; then
        # shellcheck disable=SC1090  # CANN's own script, found at run time
        . "$env_script"
        break
    fi
done
if [ "$#" -eq 0 ]; then
    set -- cascade-rcnn --help
fi
exec "$@"
