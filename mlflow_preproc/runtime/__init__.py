"""The flavor and record runtime: what a logged model needs to run its preprocessing.

``flavor`` (the MLflow flavor), ``code_capture`` (function, file and folder capture),
``records`` (the record contract), ``formats`` (bytes <-> records), ``jsonable`` (JSON rules),
``avro_schemas`` (.avsc loading), ``batch_run`` (``mlflow-preproc run``) and
``model_identity`` (registered name and version of a model URI).
"""
