"""Getting a preprocessing model to the executors, and loading it there once per process.

The model is downloaded once, on the driver. With a ``local[...]`` master the executors share
the driver's file system and load that folder; otherwise the folder is zipped and sent with
``SparkContext.addFile``, as MLflow's ``spark_udf`` does. Python workers are reused between
tasks, so each loads the model once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass

from mlflow_preproc.runtime import parity
from mlflow_preproc.runtime.flavor import LoadedPreprocessing, _load_from_dir, load_preprocessing

_loaded: dict[str, LoadedPreprocessing] = {}


@dataclass(frozen=True)
class ShippedModel:
    """Where executors find a model: a local folder, or the name of a file added to Spark."""

    local_dir: str | None = None
    spark_file: str | None = None
    model_uri: str = ""  # named in a parity diff
    parity_check: str = "refuse"  # the driver's PARITY_CHECK

    def load(self) -> LoadedPreprocessing:
        """The model, loaded and its parity checked once per Python worker process."""
        key = self.local_dir or self.spark_file
        if key not in _loaded:
            loaded = _load_from_dir(self.local_dir or _extract(self.spark_file))
            loaded.check_parity(f"{self.model_uri} on a Spark executor", self.parity_check)
            _loaded[key] = loaded
        return _loaded[key]


def ship(spark, model_uri: str, workdir: str | None = None, parity_check: str | None = None
         ) -> tuple[LoadedPreprocessing, ShippedModel]:
    """Download ``model_uri`` on the driver, load it and check its parity (so a bad model
    fails here, with its message) and make it reachable from the executors, which check it
    again in their own environment. ``parity_check``: ``refuse`` or ``warn`` (default: the
    driver's ``PARITY_CHECK``), on the driver and the executors.

    The download goes to ``workdir`` (a new temporary folder by default), which must outlive
    every job that uses the model: DataFrames are lazy.
    """
    parity_check = parity_check or parity.action_from_env()
    base = tempfile.mkdtemp(prefix="mlflow-preproc-", dir=workdir)
    loaded = load_preprocessing(model_uri, dst_path=base)
    loaded.check_parity(f"{model_uri} on the Spark driver", parity_check)
    if spark.sparkContext.master.startswith("local"):
        return loaded, ShippedModel(local_dir=loaded.model_dir, model_uri=model_uri,
                                    parity_check=parity_check)
    archive = shutil.make_archive(os.path.join(base, "model"), "zip", loaded.model_dir)
    # A unique name: SparkFiles are looked up by base name, and two models may be shipped.
    named = os.path.join(base, f"preprocessing-model-{os.path.basename(base)}.zip")
    os.rename(archive, named)
    spark.sparkContext.addFile(named)
    return loaded, ShippedModel(spark_file=os.path.basename(named), model_uri=model_uri,
                                parity_check=parity_check)


def _extract(spark_file: str) -> str:
    from pyspark import SparkFiles

    target = tempfile.mkdtemp(prefix="mlflow-preproc-model-")
    with zipfile.ZipFile(SparkFiles.get(spark_file)) as archive:
        archive.extractall(target)
    return target
