#!/usr/bin/env bash
# Fetch Spark's Kafka source (org.apache.spark:spark-sql-kafka-0-10_2.13, the version of the
# installed pyspark, and the jars it needs) from Maven Central with mvn into a cache folder,
# once, and print the comma-separated list of its jars: what `--jars` takes.
#
#   bash scripts/spark-kafka.sh [PYTHON]   fetch if missing; print the jars
#
# A Spark Structured Streaming query on Kafka needs these on the driver's classpath:
#   PYSPARK_SUBMIT_ARGS="--jars $(bash scripts/spark-kafka.sh) pyspark-shell"
# (or spark.jars.packages, where Spark may download them itself; docs/spark.md).
#
# Env:
#   MLFLOW_PREPROC_CACHE  the cache root (default ${XDG_CACHE_HOME:-~/.cache}/mlflow-preproc)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-${PYTHON:-python3}}"
CACHE="${MLFLOW_PREPROC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlflow-preproc}"
SPARK_VERSION="$("$PYTHON" -c 'import pyspark; print(pyspark.__version__)')"
DIR="$CACHE/spark-kafka-$SPARK_VERSION"

# What pyspark does not ship already (its hadoop, scala, snappy, lz4 and slf4j jars would
# clash with copies of other versions).
JARS=spark-sql-kafka-0-10_2.13,spark-token-provider-kafka-0-10_2.13,kafka-clients,commons-pool2

fetch() {  # fetch $1 into $tmp/jars; false when Maven has no such version
    mvn -B -Dstyle.color=never -f "$ROOT/scripts/spark-kafka/pom.xml" \
        dependency:copy-dependencies -Dspark.version="$1" \
        -DincludeScope=runtime -DoutputDirectory="$tmp/jars" \
        -DincludeArtifactIds="$JARS" >"$tmp/mvn.log" 2>&1
}

if [[ ! -f "$DIR/complete" ]]; then
    if ! command -v mvn >/dev/null 2>&1; then
        echo "[spark-kafka] mvn is missing: apt-get install -y maven (scripts/dev.sh test does)" >&2
        exit 1
    fi
    mkdir -p "$CACHE"
    # Into a folder of this run's own, renamed when complete (two runs at once never see
    # half a folder).
    tmp="$(mktemp -d "$CACHE/spark-kafka-$SPARK_VERSION.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "[spark-kafka] fetching spark-sql-kafka-0-10 $SPARK_VERSION with mvn into $DIR" >&2
    # pyspark's own version first; a patch release may reach PyPI before Maven Central, and
    # Spark keeps binary compatibility within a minor line: then the newest earlier patch.
    IFS=. read -r major minor patch <<<"$SPARK_VERSION"
    fetched=""
    for ((p = ${patch%%[!0-9]*}; p >= 0; p--)); do
        if fetch "$major.$minor.$p"; then fetched="$major.$minor.$p"; break; fi
    done
    if [[ -z "$fetched" ]]; then
        cat "$tmp/mvn.log" >&2
        echo "[spark-kafka] mvn could not fetch spark-sql-kafka-0-10 $major.$minor.x (above;" \
             "the spark extra pins a pyspark line whose Kafka source is published)" >&2
        exit 1
    fi
    [[ "$fetched" == "$SPARK_VERSION" ]] || echo "[spark-kafka] pyspark $SPARK_VERSION:" \
        "its Kafka source is not published; using $fetched, of the same minor line" >&2
    touch "$tmp/complete"
    if ! mv -T "$tmp" "$DIR" 2>/dev/null; then
        [[ -f "$DIR/complete" ]] || { echo "[spark-kafka] cannot create $DIR" >&2; exit 1; }
    fi
    trap - EXIT
fi
ls "$DIR"/jars/*.jar | paste -sd, -
