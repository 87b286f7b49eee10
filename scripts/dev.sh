#!/usr/bin/env bash
# One entry point for developers and CI.
#
#   bash scripts/dev.sh demo            the main job on a local MLflow store and an embedded broker:
#                                       examples/quickstart (REST), examples/fink_alerts (Kafka)
#   bash scripts/dev.sh test [ARGS...]  the whole test suite (pytest ARGS, e.g. -m "not slow")
#   bash scripts/dev.sh setup           only create .venv and install the package
#
# Everything it needs is installed here: a virtualenv in .venv (PYTHON picks the interpreter)
# with the package, its test tools and its optional extras (Kubernetes client, Spark), and for
# the tests Java 17 for Spark and Prometheus (apt-get, when missing) and a Docker engine plus the
# local base image (scripts/docker-engine.sh, scripts/base-image.sh), and Apache Kafka's broker,
# fetched with Maven into a cache folder (scripts/kafka-broker.sh; the Kafka tests start it).
# MLFLOW_PREPROC_SKIP_DOCKER=1 skips the engine locally; the Docker tests then skip, except
# under CI=true where a missing engine fails them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MLFLOW_PREPROC_VENV:-$ROOT/.venv}"
cd "$ROOT"

setup() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    # The stamp avoids a slow re-resolve on every run; setup.py changes invalidate it.
    local stamp="$VENV/.mlflow-preproc-installed"
    if [[ ! -f "$stamp" || setup.py -nt "$stamp" ]]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e ".[test,kubernetes,spark,monitoring,columnar]"
        touch "$stamp"
    fi
}

# Spark (the spark extra) and Apache Kafka's broker run on the system's Java, and Maven fetches
# the broker; the alert rules are checked by a real Prometheus and its promtool (Debian's
# package; its service is not started).
install_system_packages() {
    if ! command -v java >/dev/null 2>&1 && [[ -z "${JAVA_HOME:-}" ]]; then
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y openjdk-17-jre-headless
    fi
    if ! command -v mvn >/dev/null 2>&1; then
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
            --no-install-recommends maven
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
            --no-install-recommends prometheus
    fi
}

start_docker() {
    if [[ "${MLFLOW_PREPROC_SKIP_DOCKER:-0}" == 1 ]]; then
        echo "[dev] MLFLOW_PREPROC_SKIP_DOCKER=1: not starting a Docker engine" >&2
        return
    fi
    bash scripts/docker-engine.sh start
    PYTHON="$VENV/bin/python" bash scripts/base-image.sh
}

case "${1:-}" in
    setup)
        setup
        ;;
    demo)
        setup
        "$VENV/bin/python" examples/quickstart/quickstart.py
        "$VENV/bin/python" examples/fink_alerts/fink_alerts.py
        ;;
    test)
        shift
        setup
        install_system_packages
        bash scripts/kafka-broker.sh >/dev/null
        bash scripts/spark-kafka.sh "$VENV/bin/python" >/dev/null
        start_docker
        export PATH="$VENV/bin:$PATH"
        # Every temporary file of the run (pytest's, MLflow's downloads, broker logs, build
        # contexts) goes in one folder, removed afterwards; the tests remove their images.
        TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/mlflow-preproc-tests.XXXXXX")"
        export TMPDIR
        images_before="$(docker images -aq --no-trunc 2>/dev/null | sort -u || true)"
        set +e
        # Two workers (pytest-xdist): most tests wait on subprocesses, brokers and group joins,
        # not on a CPU. Docker tests share one worker, Spark tests another (tests/conftest.py).
        # PYTEST_WORKERS=0 runs everything in one process.
        workers=()
        if [[ "${PYTEST_WORKERS:-2}" != 0 ]]; then
            workers=(-n "${PYTEST_WORKERS:-2}" --dist loadgroup)
        fi
        "$VENV/bin/python" -m pytest "${workers[@]}" "$@"
        status=$?
        set -e
        # What the tests built and did not remove (tests/conftest.py removes it at the end).
        left="$( (docker images -q --no-trunc --filter label=org.mlflow-preproc.model-uri;
                  docker images -q --no-trunc --filter dangling=true) 2>/dev/null | sort -u \
                 | comm -13 <(echo "$images_before") - || true)"
        if [[ -n "$left" ]]; then
            echo "[dev] the tests left these images behind:" $left >&2
            [[ $status -ne 0 ]] || status=1
        fi
        if [[ $status -eq 0 ]]; then
            rm -rf "$TMPDIR"
        else
            echo "[dev] tests failed; their files are kept in $TMPDIR" >&2
        fi
        # pytest exits 5 when it collected nothing: for us that is a broken suite, not a pass.
        if [[ $status -eq 5 ]]; then
            echo "[dev] pytest collected no tests" >&2
            exit 1
        fi
        exit $status
        ;;
    *)
        echo "usage: $0 demo|test [pytest args]|setup" >&2
        exit 2
        ;;
esac
