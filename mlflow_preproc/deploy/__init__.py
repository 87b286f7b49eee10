"""Images and deployment targets (the control plane; not copied into models).

``target`` is the ``preproc`` MLflow deployment target; ``image_build`` builds serving images
with the Docker SDK.
"""
