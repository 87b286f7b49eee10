"""What operators watch a stream with: Prometheus alerting rules and a Grafana dashboard,
both over the metrics of :mod:`mlflow_preproc.streaming.metrics`."""
