# Put in a preprocessing model's code/ folder by mlflow-preproc. Python imports it at start-up
# only when PYTHONPATH names that folder: then MLFLOW_PREPROC_MODE / KAFKA_ENABLED choose what
# a stock `mlflow models build-docker` image runs (see mlflow_preproc/image/entrypoint.py).
import os
import sys

# Only the container's main process (MLflow's `C._serve(...)` command), and only when asked:
# every other Python process of the image starts as if this file were not there.
if (os.environ.get("MLFLOW_PREPROC_MODE") or os.environ.get("KAFKA_ENABLED")) \
        and "_serve(" in " ".join(getattr(sys, "orig_argv", [])):
    from mlflow_preproc.image.entrypoint import take_over_stock_entrypoint

    take_over_stock_entrypoint()
