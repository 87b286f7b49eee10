#!/usr/bin/env bash
# Start / stop / inspect a local Docker engine for mlflow-preproc tests and CI.
#
# Usage: docker-engine.sh start|stop|status
#
# Env:
#   MLFLOW_PREPROC_STATE_DIR  where the pid file and log live (default /tmp/mlflow-preproc)
#   DOCKERD_START_TIMEOUT     seconds to wait for `docker info` (default 60)
#   DOCKERD_STOP_TIMEOUT      seconds between TERM and KILL on stop (default 20)
#
# Networking policy on this machine: the engine must never create its default bridge
# (it would allocate a private-range subnet and touch iptables). Containers and builds
# run with host networking instead, so only loopback is ever used.
set -euo pipefail

STATE_DIR="${MLFLOW_PREPROC_STATE_DIR:-/tmp/mlflow-preproc}"
PID_FILE="$STATE_DIR/dockerd.pid"
LOG_FILE="$STATE_DIR/dockerd.log"
START_TIMEOUT="${DOCKERD_START_TIMEOUT:-60}"
STOP_TIMEOUT="${DOCKERD_STOP_TIMEOUT:-20}"

# The only flag set allowed here; also used as our "signature" to recognise our own daemon.
DOCKERD_FLAGS=(--bridge=none --iptables=false --ip-forward=false --ip-masq=false)

log() { printf '[docker-engine] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
    # CI images usually run as root; on a developer box fall back to sudo.
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# `docker info` can hang forever against a wedged daemon, so bound it.
engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# A pid file can go stale (crash, reboot, PID reuse). Only trust it if the PID is alive,
# is a dockerd, and was started with our flags -- so we never signal somebody else's daemon.
our_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--bridge=none' || return 1
    echo "$pid"
}

ensure_packages() {
    # Fresh CI machines have neither; installing here keeps CI to a single entry point.
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        log "dockerd/docker not found; installing docker.io"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io
    fi
}

cmd_start() {
    if engine_answers; then
        if pid="$(our_pid)"; then
            log "engine already running (started by us, pid $pid)"
        else
            log "engine already answers (not started by this script); leaving it alone"
        fi
        return 0
    fi

    if pid="$(our_pid)"; then
        # Our daemon is alive but not answering: do not start a second one on the same
        # data-root (it would fail on the lock anyway); make the user look at it.
        die "our dockerd (pid $pid) is alive but 'docker info' does not answer; see $LOG_FILE or run '$0 stop'"
    fi
    rm -f "$PID_FILE"

    ensure_packages
    mkdir -p "$STATE_DIR"

    log "starting dockerd (log: $LOG_FILE)"
    # setsid: detach from the caller's session so the daemon survives the calling shell /
    # CI step and is not hit by a Ctrl-C aimed at the caller. Without job control, setsid
    # execs in place, so $! is dockerd's own PID (checked below).
    # Not via as_root: a backgrounded shell function is a subshell, so $! would not be dockerd.
    if [[ $(id -u) -eq 0 ]]; then
        setsid dockerd "${DOCKERD_FLAGS[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
    else
        # shellcheck disable=SC2024  # intended: the log is written as the calling user
        sudo setsid dockerd "${DOCKERD_FLAGS[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
    fi
    local pid=$!
    echo "$pid" >"$PID_FILE"

    local start=$SECONDS
    until engine_answers; do
        if [[ ! -e /proc/$pid ]]; then
            rm -f "$PID_FILE"
            log "dockerd exited during startup; last log lines:"
            tail -n 30 "$LOG_FILE" >&2 || true
            exit 1
        fi
        if (( SECONDS - start >= START_TIMEOUT )); then
            log "dockerd did not answer within ${START_TIMEOUT}s; last log lines:"
            tail -n 30 "$LOG_FILE" >&2 || true
            kill -TERM "$pid" 2>/dev/null || true
            rm -f "$PID_FILE"
            exit 1
        fi
        sleep 0.3
    done

    # If sudo/setsid forked, $! is a wrapper, not dockerd; record the real daemon instead.
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd && -r /var/run/docker.pid ]]; then
        pid="$(tr -dc '0-9' </var/run/docker.pid)"
        echo "$pid" >"$PID_FILE"
    fi
    log "engine ready in $((SECONDS - start))s (dockerd pid $pid, pid file $PID_FILE)"
}

cmd_stop() {
    local pid
    if ! pid="$(our_pid)"; then
        if [[ -f "$PID_FILE" ]]; then
            log "stale pid file $PID_FILE (process gone or not our dockerd); removing it"
            rm -f "$PID_FILE"
        else
            log "no pid file at $PID_FILE; nothing started by us, nothing to stop"
        fi
        return 0
    fi

    log "stopping dockerd pid $pid"
    as_root kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    # Graceful shutdown also stops its managed containerd and running containers.
    # /proc instead of `kill -0`: the latter fails with EPERM for a root daemon when not root.
    while [[ -e /proc/$pid ]] && (( waited < STOP_TIMEOUT * 10 )); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if [[ -e /proc/$pid ]]; then
        log "dockerd did not exit within ${STOP_TIMEOUT}s; sending KILL"
        as_root kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local answers=no ours=no pid=""
    engine_answers && answers=yes
    pid="$(our_pid)" && ours=yes
    echo "engine answers: $answers"
    if [[ $ours == yes ]]; then
        echo "started by us: yes (pid $pid, pid file $PID_FILE, log $LOG_FILE)"
    else
        echo "started by us: no"
    fi
    [[ $answers == yes ]]
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
