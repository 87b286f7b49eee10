#!/usr/bin/env bash
# Fetch Apache Kafka's broker (org.apache.kafka:kafka_2.13 and its runtime dependencies) from
# Maven Central with mvn into a cache folder, once, and print the folder of its jars.
#
#   bash scripts/kafka-broker.sh          fetch if missing; print the jar folder
#   bash scripts/kafka-broker.sh version  print the pinned version
#
# The tests (tests/apache_kafka.py) and benchmarks/stream_throughput.py start the broker from
# that folder themselves (java -cp 'DIR/*' kafka.Kafka ...); no Kafka distribution is
# downloaded from anywhere else. A second run costs nothing: the folder is complete once it
# has its stamp.
#
# Env:
#   MLFLOW_PREPROC_CACHE  the cache root (default ${XDG_CACHE_HOME:-~/.cache}/mlflow-preproc)
set -euo pipefail

# The one place the broker's version is pinned.
KAFKA_VERSION=4.4.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MLFLOW_PREPROC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlflow-preproc}"
DIR="$CACHE/kafka-$KAFKA_VERSION"

if [[ "${1:-}" == version ]]; then
    echo "$KAFKA_VERSION"
    exit 0
fi

if [[ ! -f "$DIR/complete" ]]; then
    if ! command -v mvn >/dev/null 2>&1; then
        echo "[kafka-broker] mvn is missing: apt-get install -y maven (scripts/dev.sh test does)" >&2
        exit 1
    fi
    mkdir -p "$CACHE"
    # Into a folder of this run's own, renamed when complete: two runs at once (two pytest
    # workers, two worktrees) never see half a folder.
    tmp="$(mktemp -d "$CACHE/kafka-$KAFKA_VERSION.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "[kafka-broker] fetching Apache Kafka $KAFKA_VERSION with mvn into $DIR" >&2
    if ! mvn -B -Dstyle.color=never -f "$ROOT/scripts/kafka/pom.xml" \
            dependency:copy-dependencies -Dkafka.version="$KAFKA_VERSION" \
            -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
        cat "$tmp/mvn.log" >&2
        echo "[kafka-broker] mvn could not fetch Apache Kafka $KAFKA_VERSION (above)" >&2
        exit 1
    fi
    touch "$tmp/complete"
    if ! mv -T "$tmp" "$DIR" 2>/dev/null; then
        [[ -f "$DIR/complete" ]] || { echo "[kafka-broker] cannot create $DIR" >&2; exit 1; }
    fi
    trap - EXIT
fi
echo "$DIR/libs"
