"""Starting Spark for ``mlflow-preproc run --engine spark``: what must be installed, and how.

pyspark is an optional extra and Java comes from the system, so both are checked before Spark
is started: a missing one is one line naming the fix, not a Py4J traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from typing import Any

from mlflow_preproc.config import ConfigError

MIN_JAVA = 17  # Spark 4 runs on Java 17 and 21
_INSTALL_JAVA = ("install a Java 17+ runtime (Debian/Ubuntu: apt-get install "
                 "openjdk-17-jre-headless) or set JAVA_HOME to one")


class SparkUnavailable(ConfigError):
    """pyspark or Java is missing; the message says how to install it."""


def require_pyspark() -> None:
    """Raise :class:`SparkUnavailable` unless pyspark can be imported."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise SparkUnavailable("the Spark engine needs pyspark, which is not installed: "
                               "pip install '.[spark]' in the mlflow-preproc clone") from None


def check_java() -> str:
    """Return the ``java`` that Spark will run, or raise :class:`SparkUnavailable`."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no java on PATH"
        raise SparkUnavailable(f"Spark needs Java ({where}); {_INSTALL_JAVA}")
    try:
        text = subprocess.run([java, "-version"], capture_output=True, text=True,
                              timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SparkUnavailable(f"cannot run {java} ({exc}); {_INSTALL_JAVA}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match:
        major = int(match.group(1))
        if major == 1:  # "1.8.0_392" is Java 8
            major = int(match.group(2) or 0)
        if major < MIN_JAVA:
            raise SparkUnavailable(f"Spark needs Java {MIN_JAVA}+, {java} is Java {major}; "
                                   f"{_INSTALL_JAVA}")
    return java


_PANDAS_3_WARNING = "ignore:PySpark does not yet fully support pandas:FutureWarning"


def start(master: str, app_name: str, progress: bool | None = None) -> Any:
    """Start (or reuse) a SparkSession on ``master``, after checking pyspark and Java."""
    # PySpark warns on every start (driver and each Python worker) that pandas 3 is not yet
    # fully supported; tests/test_spark*.py run this engine on the pandas installed with it.
    os.environ.setdefault("PYTHONWARNINGS", _PANDAS_3_WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message="PySpark does not yet fully support pandas")
    require_pyspark()
    check_java()
    from pyspark.sql import SparkSession

    local = master.startswith("local")
    if local:
        # Workers are started by the JVM with PYSPARK_PYTHON, by default the first python3 on
        # PATH, which need not be this interpreter (the console script runs from a venv's
        # bin/ that may not be on PATH). On a cluster the executors' own python is used.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # The JVM picks its address before any conf is read, warning that the host name
        # resolves to loopback and taking the first interface's instead: loopback it is.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if progress is None:
        progress = sys.stderr.isatty()
    builder = (SparkSession.builder.master(master).appName(app_name)
               .config("spark.ui.showConsoleProgress", str(bool(progress)).lower())
               # A file is worth its bytes, not 4 MB, when Spark packs files into tasks:
               # alert archives are many files of ~70 kB, and the default packs ~30 per task.
               .config("spark.sql.files.openCostInBytes", str(64 * 1024)))
    if local:
        # Everything stays on loopback (the default binds the host's first address).
        builder = builder.config("spark.driver.host", "127.0.0.1") \
                         .config("spark.driver.bindAddress", "127.0.0.1")
    spark = builder.getOrCreate()
    # Files are packed into tasks by bytes, but a deflated Avro file holds more alerts per
    # byte than a plain one: a few tasks per core keep the cores busy to the end.
    spark.conf.set("spark.sql.files.minPartitionNum",
                   str(4 * spark.sparkContext.defaultParallelism))
    spark.sparkContext.setLogLevel("ERROR")  # Spark's WARN lines would bury the counts line
    return spark
