#!/bin/bash
# A Docker-API engine for local runs: podman with runc, serving the Docker API on a unix socket,
# so docker-py (kfp.local's DockerRunner) and the docker CLI can drive it through DOCKER_HOST.
#
# Usage: engine.sh start | stop | status | config | env
#   start   installs podman and runc when missing (apt, as root), writes the engine's config and
#           starts the API service in the background; does nothing when the socket already answers
#   config  installs podman and runc when missing, writes the config and prints its path (for the
#           podman commands that build images: CONTAINERS_CONF=$(engine.sh config) podman ...)
#   stop    stops the service this script started
#   status  exit 0 when the socket answers
#   env     prints the exports that point docker-py and podman at this engine
#
# Environment:
#   ENGINE_DIR  state directory: config, socket, pid, log (default /run/cascade-rcnn-engine as root,
#               else $XDG_RUNTIME_DIR/cascade-rcnn-engine)
#
# The config is our own file, passed through CONTAINERS_CONF, so the host's /etc/containers is left
# alone. Its two settings make podman work on machines without systemd that cannot raise ulimits
# (CI sandboxes): no default ulimits, cgroupfs instead of systemd cgroups.
set -euo pipefail

if [ "$(id -u)" -eq 0 ]; then
    default_dir=/run/cascade-rcnn-engine
else
    default_dir=${XDG_RUNTIME_DIR:-/tmp}/cascade-rcnn-engine
fi
dir=${ENGINE_DIR:-$default_dir}
sock=$dir/podman.sock
conf=$dir/containers.conf
pidfile=$dir/service.pid
log=$dir/service.log

say() { echo "engine.sh: $*" >&2; }

answers() {
    # GET /_ping over the unix socket: the Docker API's liveness check.
    python3 - "$sock" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
reply = s.recv(64)
sys.exit(0 if reply.split(b" ")[1:2] == [b"200"] else 1)
PY
}

install_podman() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        say "${missing[*]} missing; install them (apt-get install podman runc) or run this as root"
        exit 1
    fi
    say "installing ${missing[*]} (apt)"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc >&2
}

write_config() {
    mkdir -p "$dir"
    cat >"$conf" <<'CONF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
CONF
}

start() {
    if answers; then
        say "already running at unix://$sock"
        return 0
    fi
    install_podman
    write_config
    rm -f "$sock"
    say "starting podman's Docker API at unix://$sock (log: $log)"
    CONTAINERS_CONF=$conf nohup podman system service --time=0 "unix://$sock" >"$log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 60); do
        if answers; then
            return 0
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            say "the service exited; its log:"
            cat "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    say "no answer on unix://$sock after 30 s; log: $log"
    exit 1
}

stop() {
    if [ ! -f "$pidfile" ]; then
        say "not started by this script (no $pidfile)"
        return 0
    fi
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile" "$sock"
    say "stopped"
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) answers ;;
config)
    install_podman
    write_config
    echo "$conf"
    ;;
env)
    echo "export DOCKER_HOST=unix://$sock"
    echo "export CONTAINERS_CONF=$conf"
    ;;
*)
    echo "usage: engine.sh start | stop | status | config | env" >&2
    exit 2
    ;;
esac
