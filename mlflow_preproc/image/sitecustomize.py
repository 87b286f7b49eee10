# Put in a preprocessing model's code/ folder by mlflow-preproc. Python imports it at start-up
# only when PYTHONPATH names that folder: then MLFLOW_PREPROC_MODE / KAFKA_ENABLED choose what
# a stock `mlflow models build-docker` image runs (see mlflow_preproc/entrypoint.py).
import os

if os.environ.get("MLFLOW_PREPROC_MODE") or os.environ.get("KAFKA_ENABLED"):
    from mlflow_preproc.image.entrypoint import take_over_stock_entrypoint

    take_over_stock_entrypoint()
