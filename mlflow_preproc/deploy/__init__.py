"""The ``preproc`` deployment target (the control plane; not copied into models).

One deployment model, two backends::

    target.py          the MLflow adapter: parses the target URI and -C keys, asks the planner
                       to check them, hands them to the backend they name, prints the steps
    planner.py         options + model -> a checked Deployment (spec.py); pure, for both
    options.py         the -C keys, each with the backends it means something on
    spec.py            Deployment, and what one container runs (ContainerSpec)
    model_image.py     a deployment's serving image (image_build.py: Dockerfile and build)
    broker_checks.py   what the broker says before anything is built
    engine.py          the Docker engine, connected on first use; errors.py, steps.py
    backend.py         the Backend interface
    docker/            containers on one engine: backend.py, rollout.py, containers.py
    kubernetes/        objects in a namespace: backend.py, manifests.py, api.py

Imports run downwards only: the adapter imports the backends, a backend imports the shared
modules (planner, model_image, spec, options...), never the adapter nor the other backend.

Adding a backend (Docker Swarm, Nomad...): a folder beside ``docker/`` with a class that has
the :class:`~mlflow_preproc.deploy.backend.Backend` methods and a ``name``; its name in
``options.BACKENDS`` and in the ``backends`` of the option keys it reads; and one line in
``target.BACKENDS``. Its tests go beside tests/test_docker.py and tests/test_kubernetes.py.
"""
