"""The build service (the control plane; not copied into models): MLflow webhooks and a REST
API turn model versions into images. ``service`` (the HTTP app), ``store`` (SQLite history),
``webhooks`` (delivery verification and build planning).
"""
